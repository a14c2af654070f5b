"""Weight sync, trainer → engines: Megatron parameters (gathered over TP, from every PP stage)
converted to HF names and layouts with the per-family mapping of ``models/hf/mapping.py``,
streamed in size-bounded buckets.

Modes: ``inprocess`` (the embedded engine in the sync rank's process), ``disk`` (safetensors +
``/update_weights_from_disk``), ``distributed`` (``/init_weights_update_group`` once, then
``/update_weights_from_distributed`` per bucket while the sync rank broadcasts each tensor over
a process group — NCCL on GPUs, gloo on CPU). Every rank calls :meth:`WeightSync.sync`; only
global rank 0 (PP stage 0, TP 0, DP 0) talks to the engines. Generation is paused around an
update and the servers flush their caches.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_trapo.config import ModelConfig
from megatron_trapo.models.hf.mapping import rule_for_key, expand, to_hf
from megatron_trapo.models.sharding import local_shards
from megatron_trapo.rollout.types import RolloutEngine, RolloutError

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def _stage_hf_tensors(chunks, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF tensors of this PP stage, on TP rank 0 (other TP ranks take part in the gathers)."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    shards = local_shards(chunks)
    keys = sorted(shards)
    layouts = [None] * tp
    dist.all_gather_object(layouts, {k: [s for _, s, _ in shards[k]] for k in keys}, group=tp_group)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for key in keys:
        items = shards[key]
        global_shape = items[0][2]
        full = None
        if all(tuple(v.shape) == tuple(global_shape) for v, _, _ in items):
            full = items[0][0].detach()  # replicated over TP (norms) or TP=1
        else:
            full = torch.empty(global_shape, dtype=items[0][0].dtype, device=items[0][0].device)
            for idx, (view, _, _) in enumerate(items):
                parts = [torch.empty_like(view) for _ in range(tp)]
                dist.all_gather(parts, view.detach().contiguous(), group=tp_group)
                for r in range(tp):
                    full[layouts[r][key][idx]] = parts[r]
        if tp_rank == 0:
            rule, layer = rule_for_key(model, key)
            _, names = expand(rule, layer)
            for name, tensor in zip(names, to_hf(rule.kind, full, model)):
                yield name, tensor.detach().cpu()


def hf_named_tensors(chunks, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, yielded on global rank 0 (PP stages send theirs to it)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return  # replicas hold the same weights
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    if pp_rank == 0:
        yield from _stage_hf_tensors(chunks, model)  # other TP ranks only join the gathers
        if tp_rank == 0:
            for src in pp_ranks[1:]:  # receive the later stages' tensors, in stage order
                meta: List = [None]
                dist.recv_object_list(meta, src=src)
                for name, shape, dtype in meta[0]:
                    t = torch.empty(shape, dtype=dtype)
                    dist.recv(t, src=src)
                    yield name, t
    else:
        tensors = list(_stage_hf_tensors(chunks, model))
        if tp_rank == 0:
            dst = pp_ranks[0]
            dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in tensors]], dst=dst)
            for _, t in tensors:
                dist.send(t.contiguous(), dst=dst)


def _sync_address(server_urls: List[str]) -> str:
    """Where servers reach the sync rank: loopback when they all run on this machine, else
    this host's address (override with TRAPO_WEIGHT_SYNC_ADDR on multi-homed nodes)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("TRAPO_WEIGHT_SYNC_ADDR"):
        return os.environ["TRAPO_WEIGHT_SYNC_ADDR"]
    hosts = {urlparse(u).hostname for u in server_urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def buckets(named: Iterator[Tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class WeightSync:
    """Pushes the trainer's weights to a rollout engine (see module docstring)."""

    def __init__(self, engine: Optional[RolloutEngine], model: ModelConfig, mode: str,
                 bucket_bytes: int = 512 * 1024**2, disk_dir: Optional[str] = None,
                 backend: Optional[str] = None, master_port: Optional[int] = None,
                 hf_config: Optional[dict] = None):
        if mode not in ("inprocess", "disk", "distributed"):
            raise RolloutError(f"weight sync mode must be inprocess, disk or distributed, got {mode!r}")
        self.engine, self.model, self.mode = engine, model, mode
        self.bucket_bytes = bucket_bytes
        self.disk_dir = disk_dir
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_port = master_port
        self.hf_config = hf_config  # base config.json written beside disk weights
        self._group = None

    def _is_sync_rank(self) -> bool:
        return dist.get_rank() == 0

    def _ensure_group(self) -> None:
        from megatron_trapo.rollout.process_group import stateless_group
        from megatron_trapo.rollout.servers import free_port

        if self._group is not None:
            return
        port = self.master_port or free_port()
        address = _sync_address(getattr(getattr(self.engine, "pool", None), "urls", []))
        world = self.engine.init_weights_update_group(address, port, self.backend)
        self._group = stateless_group(address, port, 0, world, self.backend)
        self.engine.finish_init_group()

    def sync(self, chunks, weight_version: str) -> Dict[str, float]:
        """Collective over all trainer ranks; returns timing/size stats (on rank 0)."""
        t0 = time.time()
        named = hf_named_tensors(chunks, self.model)
        stats = {"bytes": 0.0, "tensors": 0.0, "buckets": 0.0}
        if not self._is_sync_rank():
            for _ in named:  # non-sync ranks only take part in the gathers and sends
                pass
            dist.barrier()
            return stats
        pause = getattr(self.engine, "pause", None)
        if pause is not None:
            pause()
        try:
            if self.mode == "disk":
                self._sync_disk(named, weight_version, stats)
            else:
                if self.mode == "distributed":
                    self._ensure_group()
                for bucket in buckets(named, self.bucket_bytes):
                    stats["buckets"] += 1
                    stats["tensors"] += len(bucket)
                    stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                    if self.mode == "inprocess":
                        self.engine.update_weights_from_tensors(dict(bucket), weight_version)
                    else:
                        self._broadcast_bucket(bucket, weight_version)
        finally:
            resume = getattr(self.engine, "resume", None)
            if resume is not None:
                resume()
        dist.barrier()
        stats["seconds"] = time.time() - t0
        return stats

    def _broadcast_bucket(self, bucket, weight_version: str) -> None:
        names = [n for n, _ in bucket]
        dtypes = [_DTYPE_NAMES[t.dtype] for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        futures = self.engine.start_distributed_update(names, dtypes, shapes, weight_version)
        device = "cuda" if self.backend == "nccl" else "cpu"
        for _, t in bucket:
            self._group.broadcast(t.to(device).contiguous(), 0).wait()
        self.engine.finish_distributed_update(futures, weight_version)

    def _sync_disk(self, named, weight_version: str, stats) -> None:
        import json

        from megatron_trapo.models.hf.files import HFCheckpointWriter
        from megatron_trapo.models.hf.mapping import model_to_hf_config

        root = Path(self.disk_dir or tempfile.mkdtemp(prefix="trapo_weights_"))
        out = root / f"v{weight_version}"
        writer = HFCheckpointWriter(out, self.bucket_bytes)
        for name, t in named:
            writer.add(name, t)
            stats["tensors"] += 1
            stats["bytes"] += t.numel() * t.element_size()
        stats["buckets"] = float(len(writer.close()))
        (out / "config.json").write_text(json.dumps(model_to_hf_config(self.model, self.hf_config),
                                                    indent=2))
        self.engine.update_weights_from_disk(str(out), weight_version)
