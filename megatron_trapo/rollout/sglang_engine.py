"""``engine: sglang`` — generation through SGLang servers (behind sglang-router), weight updates
to each server directly (the router answers 404 for them).

Every sample is one HTTP request (``n = 1``, its own ``sampling_seed``), as slime does: a
request that fails (connection dropped, 5xx, timeout) is retried through the router — which
then routes to another server — after a health check that drops dead servers from the pool and
the router. A sample is kept exactly once: the first successful answer for its (request,
sample) slot.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import httpx

from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.servers import ServerPool
from megatron_trapo.rollout.types import (RolloutEngine, RolloutError, RolloutRequest, Sample,
                                          empty_sample)

logger = logging.getLogger(__name__)


class SGLangEngine(RolloutEngine):
    name = "sglang"

    def __init__(self, pool: ServerPool, request_timeout_s: float = 600, max_retries: int = 3,
                 concurrency: Optional[int] = None, seed: int = 0,
                 concurrency_per_server: int = 256):
        # in-flight requests: one HTTP connection (and thread) each; by default enough to fill
        # every server's batch (SGLang schedules hundreds of sequences per server)
        concurrency = concurrency or concurrency_per_server * max(len(pool.urls), 1)
        self.pool = pool
        self.timeout = request_timeout_s
        self.max_retries = max_retries
        self.client = httpx.Client(timeout=request_timeout_s,
                                   headers={"Content-Type": "application/json"},
                                   limits=httpx.Limits(max_connections=concurrency))
        self.executor = ThreadPoolExecutor(max_workers=concurrency)
        self._rng = random.Random(seed)
        self._check_lock = threading.Lock()
        self._version = self._server_version()
        self.retries = 0  # failed attempts retried (metric)
        self._warned_seeds = False

    def _server_version(self) -> str:
        try:
            return str(httpx.get(self.pool.urls[0] + "/get_model_info", timeout=10).json()
                       .get("weight_version", "0"))
        except (httpx.HTTPError, ValueError):
            return "0"

    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def dead_servers(self) -> List[str]:
        return list(self.pool.dead)

    def server_urls(self) -> List[str]:
        return list(self.pool.urls)

    def describe(self) -> str:
        where = "launched by this task" if self.pool.processes else "attached"
        router = f", router {self.pool.router.url}" if self.pool.router is not None else ""
        return f"rollout engine {self.name}: servers {self.pool.urls} {where}{router}"

    def drop_dead_servers(self) -> List[str]:
        dropped = []
        with self._check_lock:
            for url in self.pool.check():
                dropped.append(url)
                logger.warning("rollout: server %s is dead; dropped — continuing on %d server(s) "
                               "(%s); its unfinished samples are retried on them", url,
                               len(self.pool.urls), ", ".join(self.pool.urls) or "none")
        return dropped

    def health_metrics(self):
        return {"rollout/servers_live": float(len(self.pool.urls)),
                "rollout/servers_dead": float(len(self.pool.dead)),
                "rollout/retries": float(self.retries)}

    def _one(self, payload: dict, prefix_len: int, where: str) -> Sample:
        last: Optional[str] = None
        for attempt in range(self.max_retries + 1):
            if not self.pool.urls:
                raise RolloutError(f"{where}: no live server left (dead: {self.pool.dead})")
            try:
                r = self.client.post(self.pool.generate_url + "/generate", json=payload)
                if r.status_code in (400, 413, 415, 422):  # our request is wrong: no retry
                    raise RolloutError(f"{where}: server refused the request: {r.text[:300]}")
                if r.status_code == 200:
                    return protocol.sample_from_sglang(r.json(), prefix_len)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code == 503 and "retry-after" in r.headers:  # queue full: back off
                    time.sleep(min(float(r.headers["retry-after"] or 1), 10.0))
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            self.retries += 1
            self.drop_dead_servers()
        raise RolloutError(f"{where}: failed after {self.max_retries + 1} attempts ({last})")

    def servers_ignoring_seeds(self) -> List[str]:
        """Live servers that ignore ``sampling_seed``: SGLang reads it only when started with
        ``--enable-deterministic-inference`` (else seeded samples are random, silently)."""
        ignoring = []
        for url in self.pool.urls:
            try:
                info = self._server_info(url)
            except (RolloutError, httpx.HTTPError, ValueError):
                continue  # a dead server is the failover's business
            if not info.get("enable_deterministic_inference", False):
                ignoring.append(url)
        return ignoring

    def _warn_if_seeds_ignored(self, requests: Sequence[RolloutRequest]) -> None:
        if self._warned_seeds or not any(r.sampling.seed is not None for r in requests):
            return
        self._warned_seeds = True
        ignoring = self.servers_ignoring_seeds()
        if ignoring:
            logger.warning(
                "SGLang server(s) %s run without --enable-deterministic-inference: they ignore "
                "sampling_seed, so seeded rollouts are not reproducible (add the flag to "
                "rollout.server_args or the server command; it costs some throughput)",
                ", ".join(ignoring))

    def generate(self, requests: Sequence[RolloutRequest]) -> List[List[Sample]]:
        self._warn_if_seeds_ignored(requests)
        futures = []
        for i, req in enumerate(requests):
            sp = req.sampling
            budget = req.generation_budget()
            for j in range(sp.n):
                if budget == 0:  # the prefix used the whole budget: nothing to generate
                    futures.append((i, j, None))
                    continue
                seed = sp.seed + j if sp.seed is not None else self._rng.randrange(2**31)
                one = type(sp)(n=1, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                               max_new_tokens=budget, stop_token_ids=sp.stop_token_ids, seed=seed)
                payload = protocol.sglang_payload(req.input_ids(), one, seed)
                futures.append((i, j, self.executor.submit(
                    self._one, payload, len(req.prefix_ids), f"request {i} sample {j}")))
        out: List[List[Optional[Sample]]] = [[None] * r.sampling.n for r in requests]
        for i, j, fut in futures:
            out[i][j] = (fut.result() if fut is not None else
                         empty_sample(requests[i], self._version))
        # The router retries on its own, so a dead server may never surface as a failed
        # request here: look for dead servers after every batch too, drop and report them.
        self.drop_dead_servers()
        return out  # type: ignore[return-value]

    # --- weights: to every server directly ----------------------------------------------------

    def _post_all(self, path: str, body: dict) -> None:
        for url in list(self.pool.urls):
            try:
                r = self.client.post(url + path, json=body)
            except httpx.HTTPError:
                # a server that died since the last check (killed between the sync's
                # drop_dead_servers and this call) is dropped; a live one that fails is an error
                if url in self.drop_dead_servers():
                    continue
                raise
            ok = r.status_code == 200 and r.json().get("success", True)
            if not ok:
                raise RolloutError(f"{url}{path} failed: HTTP {r.status_code} {r.text[:300]}")

    def pause(self) -> None:
        self._post_all("/pause_generation", {"mode": "in_place"})

    def resume(self) -> None:
        self._post_all("/continue_generation", {})

    def update_weights_from_disk(self, path: str, weight_version: str) -> None:
        self._post_all("/update_weights_from_disk", {"model_path": path, "flush_cache": True,
                                                     "weight_version": str(weight_version)})
        self._version = str(weight_version)

    def weight_group_ranks(self) -> List[int]:
        """Ranks each live server puts into the weight group: its ``tp_size × pp_size``
        (SGLang joins every TP worker as ``rank_offset + tp_rank``). A server with
        ``dp_size > 1`` is refused: its replicas would all take the same ranks."""
        ranks = []
        for url in self.pool.urls:
            info = self._server_info(url)
            dp = int(info.get("dp_size", 1) or 1)
            if dp > 1:
                raise RolloutError(
                    f"{url}: dp_size={dp}; distributed weight sync needs one SGLang server per "
                    "TP group (its DP replicas would take the same ranks in the weight group): "
                    "launch --dp-size 1 servers behind the router instead")
            ranks.append(int(info.get("tp_size", 1) or 1) * int(info.get("pp_size", 1) or 1))
        return ranks

    def _server_info(self, url: str) -> dict:
        for path in ("/server_info", "/get_server_info"):  # newer SGLang; older ones
            r = self.client.get(url + path)
            if r.status_code == 200:
                return r.json()
        raise RolloutError(f"{url}: neither /server_info nor /get_server_info answers "
                           f"(HTTP {r.status_code})")

    def init_weights_update_group(self, master_address: str, master_port: int, backend: str,
                                  ranks: Sequence[int], group_name: str) -> int:
        """Ask every server to join the group (the replies come once the trainer has joined
        too: :meth:`finish_init_group`); returns the group's world size."""
        world = 1 + sum(ranks)
        offsets = [1 + sum(ranks[:k]) for k in range(len(ranks))]
        bodies = [{"master_address": master_address, "master_port": master_port,
                   "rank_offset": off, "world_size": world, "group_name": group_name,
                   "backend": backend} for off in offsets]
        self._pending = [self.executor.submit(self.client.post, url + "/init_weights_update_group",
                                              json=body)
                         for url, body in zip(self.pool.urls, bodies)]
        return world

    def finish_init_group(self) -> None:
        for fut in self._pending:
            r = fut.result()
            if r.status_code != 200 or not r.json().get("success", False):
                raise RolloutError(f"init_weights_update_group failed: {r.text[:300]}")

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the group on every live server (a dead one is gone anyway)."""
        for url in self.pool.urls:
            try:
                self.client.post(url + "/destroy_weights_update_group",
                                 json={"group_name": group_name}, timeout=60)
            except httpx.HTTPError as exc:
                logger.warning("%s: destroy_weights_update_group failed: %s", url, exc)

    def start_distributed_update(self, names, dtypes, shapes, weight_version: str,
                                 group_name: str):
        body = {"names": names, "dtypes": dtypes, "shapes": shapes,
                "group_name": group_name, "flush_cache": True,
                "weight_version": str(weight_version)}
        return [self.executor.submit(self.client.post, url + "/update_weights_from_distributed",
                                     json=body) for url in self.pool.urls]

    def finish_distributed_update(self, futures, weight_version: str) -> None:
        for fut in futures:
            r = fut.result()
            if r.status_code != 200 or not r.json().get("success", False):
                raise RolloutError(f"update_weights_from_distributed failed: {r.text[:300]}")
        self._version = str(weight_version)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.pool.close()
