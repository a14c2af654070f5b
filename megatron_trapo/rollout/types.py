"""The one rollout interface every engine implements.

Logprob semantics (all engines): ``logprobs[i]`` is the **raw** log-probability of generated
token ``i`` — ``log_softmax(logits)`` of the model at that position, *before* temperature,
top-p and top-k — the same quantity the trainer computes, so importance ratios and TIS compare
like with like at any sampling temperature. (SGLang servers are launched with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` to return exactly this; vLLM returns raw logprobs by
default; the HF engine computes it from the fp32 logits it samples from.)

A request's ``prefix_ids`` (an expert-solution prefix) are appended to the prompt and consumed
from the ``max_new_tokens`` budget; they are *not* returned as generated tokens.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, runtime_checkable


class RolloutError(RuntimeError):
    """A rollout request cannot be served (names the request and the reason)."""


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``seed`` makes sample j of a
    request use seed ``seed + j`` (distinct, reproducible samples)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128  # includes the expert prefix's tokens
    stop_token_ids: List[int] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise RolloutError(f"sampling n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise RolloutError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RolloutError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise RolloutError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutRequest:
    prompt_ids: List[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix_ids: List[int] = field(default_factory=list)

    def input_ids(self) -> List[int]:
        return list(self.prompt_ids) + list(self.prefix_ids)

    def generation_budget(self) -> int:
        budget = self.sampling.max_new_tokens - len(self.prefix_ids)
        if budget < 0:
            raise RolloutError(f"expert prefix of {len(self.prefix_ids)} tokens exceeds "
                               f"max_new_tokens={self.sampling.max_new_tokens}")
        return budget


@dataclass
class Sample:
    """One generated completion (after the prompt and the prefix)."""

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str  # "stop" | "length"
    weight_version: str
    prefix_len: int = 0


def empty_sample(request: "RolloutRequest", weight_version: str) -> "Sample":
    """The sample of a request whose expert prefix used the whole budget: nothing to generate
    (the prefix itself is the sample, e.g. a full expert solution)."""
    return Sample([], [], "length", weight_version, len(request.prefix_ids))


class RolloutEngine(abc.ABC):
    """Generate completions and receive new weights. Server engines also pause while weights
    change, drop servers that died, and (those that can) implement
    :class:`BroadcastReceiver`."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest]) -> List[List[Sample]]:
        """``result[i][j]`` is sample j of request i (``requests[i].sampling.n`` of them)."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> str:
        ...

    def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        raise NotImplementedError(f"{self.name} cannot load weights from disk")

    def pause(self) -> None:
        """Hold generation while the weights change (no-op for an in-process engine)."""

    def resume(self) -> None:
        """Undo :meth:`pause`."""

    def server_urls(self) -> List[str]:
        """The live servers behind this engine (none for an in-process engine)."""
        return []

    def drop_dead_servers(self) -> List[str]:
        """Health-check the servers; forget (and return) the ones that stopped answering."""
        return []

    def update_weights_from_tensors(self, named_tensors: Dict[str, "object"],
                                    weight_version: str) -> None:
        raise NotImplementedError(f"{self.name} cannot receive weights in-process")

    def describe(self) -> str:
        """One line for a log: which engine, which servers."""
        return f"rollout engine {self.name} (in this process)"

    def health_metrics(self) -> Dict[str, float]:
        """Per-step metrics of the engine's servers (live, dead, retried requests); none for an
        in-process engine."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@runtime_checkable
class BroadcastReceiver(Protocol):
    """An engine whose servers join a process group with the trainer and receive weights by
    broadcast (SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed``)."""

    @property
    def dead_servers(self) -> List[str]: ...

    def server_urls(self) -> List[str]: ...

    def weight_group_ranks(self) -> List[int]: ...

    def init_weights_update_group(self, master_address: str, master_port: int, backend: str,
                                  ranks: Sequence[int], group_name: str) -> int: ...

    def finish_init_group(self) -> None: ...

    def destroy_weights_update_group(self, group_name: str) -> None: ...

    def start_distributed_update(self, names, dtypes, shapes, weight_version: str,
                                 group_name: str): ...

    def finish_distributed_update(self, futures, weight_version: str) -> None: ...
