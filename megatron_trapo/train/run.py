"""What a training run holds between steps, typed: the model and its optimizer on every rank;
the prompts, the rollout engine and the reward on the ranks that generate (global rank 0, or
every data-parallel rank with data-parallel rollouts), grouped in :class:`RolloutSide` so that
"None on the other ranks" is in the type, with :class:`RolloutShare` saying which prompts a
rank generates."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

from megatron_trapo.config import ModelConfig, TrainConfig
from megatron_trapo.data.items import PromptData, PromptItem
from megatron_trapo.rollout.types import RolloutEngine
from megatron_trapo.train.timing import StepTimers

if TYPE_CHECKING:  # annotations only: megatron-core and transformers are slow to import
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from transformers import PreTrainedTokenizerBase

    from megatron_trapo.reward.math_reward import MathReward
    from megatron_trapo.rollout.weight_sync import WeightSync


@dataclass(frozen=True)
class RolloutShare:
    """The prompts this rank generates: every ``world``-th one from ``rank`` (strided, so that
    each rank gets a mix of a step's prompts rather than a block of neighbours)."""

    rank: int
    world: int

    def indices(self, n: int) -> List[int]:
        return list(range(self.rank, n, self.world))

    def merge(self, parts: List[list], n: int) -> list:
        """The ``world`` ranks' results (``parts[r]`` in the order of ``indices``) as one
        list in prompt order."""
        out: list = [None] * n
        for r, part in enumerate(parts):
            idx = RolloutShare(r, self.world).indices(n)
            if len(part) != len(idx):
                raise RuntimeError(f"rollout rank {r} returned {len(part)} results for "
                                   f"{len(idx)} prompts")
            for i, value in zip(idx, part):
                out[i] = value
        return out


@dataclass
class RolloutSide:
    """A generating rank's part of a run."""

    data: Optional[PromptData]  # None: no training prompts (an evaluation-only run)
    eval_items: List[PromptItem]  # the in-loop held-out problems
    engine: RolloutEngine
    reward: "MathReward"
    share: RolloutShare = RolloutShare(0, 1)

    def close(self) -> None:
        """The verifier workers, and the engine's own processes: the servers it launched and
        the sglang-router in front of them (a router left behind outlived every run, in its own
        session and under another name)."""
        self.reward.close()
        self.engine.close()


@dataclass
class Run:
    cfg: TrainConfig
    ddp: List["DistributedDataParallel"]  # one model chunk per virtual pipeline stage
    optimizer: "MegatronOptimizer"
    scheduler: "OptimizerParamScheduler"
    model: ModelConfig  # the architecture actually built (from load= when given)
    tokenizer: "PreTrainedTokenizerBase"
    sync: "WeightSync"
    eos_id: int
    pad_id: int
    stop_ids: List[int]
    rollout: Optional[RolloutSide]  # rank 0 only
    data_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)  # rows kept/skipped
    timers: StepTimers = dataclasses.field(default_factory=StepTimers)  # this step's phases
    # the weight version the engine has not been sent yet: a method that never generates
    # (SFT) sends its weights when they are next used, by an evaluation (:meth:`sync_engine`)
    unsent_version: Optional[str] = None

    def sync_engine(self) -> Dict[str, float]:
        """Send the engine the weights it has not had yet (collective, every rank); the
        sync's stats as ``sync/*`` metrics, {} when it was up to date."""
        if self.unsent_version is None or self.sync is None:
            return {}
        version, self.unsent_version = self.unsent_version, None
        return {f"sync/{k}": float(v) for k, v in self.sync.sync(self.ddp, version).items()}

    @property
    def engine(self) -> Optional[RolloutEngine]:
        return self.rollout.engine if self.rollout is not None else None

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
