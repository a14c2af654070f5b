"""``engine: vllm`` — generation through vLLM's OpenAI-compatible ``/v1/completions`` with
token-id prompts (choices grouped per prompt: index = prompt·n + j). vLLM returns raw logprobs
by default (before temperature), matching :mod:`megatron_trapo.rollout.types`.

Weights: vLLM's RL weight-transfer endpoints (``--weight-transfer-config``; NCCL on GPUs:
``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``) are the production path. Reloading from disk goes through
``/collective_rpc`` (server started with ``VLLM_SERVER_DEV_MODE=1``); the CPU build's reload
leaves wrong weights (measured), so it is not relied on in CPU tests.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import httpx

from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.types import RolloutEngine, RolloutError, RolloutRequest, Sample


class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, urls: List[str], model: str, request_timeout_s: float = 600,
                 max_retries: int = 2, weight_version: str = "0"):
        if not urls:
            raise RolloutError("engine vllm needs at least one server URL")
        self.urls, self.model = list(urls), model
        self.client = httpx.Client(timeout=request_timeout_s,
                                   headers={"Content-Type": "application/json"})
        self.executor = ThreadPoolExecutor(max_workers=max(4, 4 * len(urls)))
        self.max_retries = max_retries
        self._version = str(weight_version)
        self._next = 0
        self.model = self._served_model(model)

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
                if r.status_code == 400:
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
            samples = [Sample([], [], "length", self._version, prefix) for _ in range(n)] \
                if fut is None else \
                protocol.samples_from_vllm(fut.result(), 1, n, [prefix], self._version)[0]
            out[i][first:first + n] = samples
        return out  # type: ignore[return-value]

    def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        for url in self.urls:
            r = self.client.post(url + "/collective_rpc",
                                 json={"method": "reload_weights",
                                       "kwargs": {"weights_path": path}})
            if r.status_code != 200:
                raise RolloutError(f"{url}/collective_rpc reload_weights failed: HTTP "
                                   f"{r.status_code} {r.text[:300]} (needs VLLM_SERVER_DEV_MODE=1)")
        self._version = str(weight_version)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
