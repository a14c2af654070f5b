"""Weight sync, trainer → engines: Megatron parameters (gathered over TP, from every PP stage)
converted to HF names and layouts with the per-family mapping of ``models/hf/mapping.py``,
streamed in size-bounded buckets.

Modes: ``inprocess`` (the HF engine in the sync rank's process), ``disk`` (safetensors +
``/update_weights_from_disk``), ``distributed`` (``/init_weights_update_group`` once, then
``/update_weights_from_distributed`` per bucket while the sync rank broadcasts each tensor over
a process group — NCCL on GPUs, gloo on CPU). Every rank calls :meth:`WeightSync.sync`; only
global rank 0 (PP stage 0, TP 0, DP 0) talks to the engines. Generation is paused around an
update and the servers flush their caches.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import httpx
import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_trapo.config import LOOPBACK_HOSTS, ModelConfig
from megatron_trapo.models.hf.files import HFCheckpointWriter
from megatron_trapo.models.hf.mapping import expand, model_to_hf_config, rule_for_key, to_hf
from megatron_trapo.models.sharding import local_shards, whole_view
from megatron_trapo.platform import compute_device
from megatron_trapo.platform.distributed import free_port, host_group
from megatron_trapo.rollout import fp8
from megatron_trapo.rollout.process_group import (destroy_weight_update_group,
                                                  init_weight_update_group)
from megatron_trapo.rollout.types import BroadcastReceiver, RolloutEngine, RolloutError

logger = logging.getLogger(__name__)

# the names SGLang's /update_weights_from_distributed takes (getattr(torch, name))
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16",
                fp8.FP8: "float8_e4m3fn"}


def _stage_hf_tensors(chunks, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF tensors of this PP stage, on TP rank 0 (other TP ranks take part in the gathers)."""
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
        elif tp == 1 and (whole := whole_view(items)) is not None:
            full = whole.detach()  # SwiGLU's halves of one fused tensor: a view, not a copy
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
                yield name, tensor.detach()  # stays on the device (only disk mode copies out)


def hf_named_tensors(chunks, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, yielded on global rank 0 (PP stages send theirs to it).

    Tensors stay where the model lives: later stages send device tensors and stage 0
    receives into device buffers, so the p2p works on NCCL (which carries no CPU tensors);
    each tensor is preceded by its name/shape/dtype and sent as soon as it is gathered, so no
    stage buffers its whole share anywhere."""
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return  # replicas hold the same weights
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    if pp_rank == 0:
        yield from _stage_hf_tensors(chunks, model)  # other TP ranks only join the gathers
        if tp_rank == 0:
            for src in pp_ranks[1:]:  # receive the later stages' tensors, in stage order
                while True:
                    meta: List = [None]
                    dist.recv_object_list(meta, src=src)
                    if meta[0] is None:  # this stage is done
                        break
                    name, shape, dtype = meta[0]
                    t = torch.empty(shape, dtype=dtype, device=compute_device())
                    dist.recv(t, src=src)
                    yield name, t
    else:
        dst = pp_ranks[0]
        for name, t in _stage_hf_tensors(chunks, model):  # streamed: one tensor in flight
            if tp_rank == 0:
                dist.send_object_list([(name, tuple(t.shape), t.dtype)], dst=dst)
                dist.send(t.contiguous(), dst=dst)
        if tp_rank == 0:
            dist.send_object_list([None], dst=dst)


def sync_address(server_urls: List[str], configured: Optional[str] = None) -> str:
    """Where servers reach the sync rank's store and group: ``rollout.weight_sync_address``
    (or ``TRAPO_WEIGHT_SYNC_ADDR``) when set; loopback when every server is on this machine;
    else the IPv4 address of the interface ``NCCL_SOCKET_IFNAME`` names (the one NCCL will use
    too); else the address of the interface that routes to the first server (a UDP "connect"
    sends nothing). ``gethostname()`` is not used: it often resolves to 127.0.1.1 or to a
    management network."""
    if configured or os.environ.get("TRAPO_WEIGHT_SYNC_ADDR"):
        return configured or os.environ["TRAPO_WEIGHT_SYNC_ADDR"]
    hosts = [urlparse(u).hostname for u in server_urls]
    if set(hosts) <= LOOPBACK_HOSTS:
        return "127.0.0.1"
    ifname = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if ifname and not ifname.startswith("^"):
        wanted = [n.lstrip("=") for n in ifname.split(",")]
        for name, addrs in psutil.net_if_addrs().items():
            if any(name == w or (not ifname.startswith("=") and name.startswith(w))
                   for w in wanted):
                for a in addrs:
                    if a.family == socket.AF_INET:
                        return a.address
        raise RolloutError(f"NCCL_SOCKET_IFNAME={ifname}: no interface with an IPv4 address "
                           "matches; set rollout.weight_sync_address")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((hosts[0], 9))
            return s.getsockname()[0]
    except OSError as exc:  # unresolvable host, no route
        raise RolloutError(f"weight sync: no interface routes to {hosts[0]} ({exc}); set "
                           "rollout.weight_sync_address or NCCL_SOCKET_IFNAME") from exc


def buckets(named: Iterator[Tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Size-bounded lists of tensors; an FP8 weight's scale stays in its weight's bucket (an
    engine that dequantizes needs the pair together)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes and not fp8.is_scale(name):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


GROUP_NAME = "weight_update_group"


def _sync_again(again: bool) -> bool:
    """Rank 0's verdict on the sync (``again``: a server died mid-push) reaches every rank on
    the gloo host group; the ranks wait for it there (long timeout), not in an NCCL barrier
    under the watchdog, while rank 0 talks to the servers."""
    flag = torch.tensor([int(again)], dtype=torch.int32)
    dist.broadcast(flag, src=0, group=host_group())
    return bool(flag.item())


class InProcessSync:
    """``inprocess``: the HF engine in this process takes the tensors bucket by bucket."""

    rebuilds = 0  # no group to form again

    def __init__(self, sync: "WeightSync"):
        self.sync = sync

    def abandon(self) -> None:
        """Nothing half-sent to undo: the next push replaces every tensor."""

    def push(self, named, weight_version: str, stats: Dict[str, float]) -> None:
        # at TP = PP = 1 the HF tensors are views of the trainer's parameters, which the
        # engine may then generate from directly (rollout.share_trainer_weights); gathered
        # TP / PP tensors are temporaries, copied as before
        whole = ps.get_tensor_model_parallel_world_size() == 1 and \
            ps.get_pipeline_model_parallel_world_size() == 1
        if self.sync.quantization == "fp8":  # the engine computes with the FP8 weights
            named = fp8.fake_quantized(named, self.sync.fp8_block_size)
        for bucket in _counted_buckets(named, self.sync.bucket_bytes, stats):
            self.sync.engine.update_weights_from_tensors(dict(bucket), weight_version,
                                                         share=whole)


class DiskSync:
    """``disk``: an HF folder per version (safetensors + config.json) that the servers load;
    the newest ``keep_versions`` are kept."""

    rebuilds = 0

    def __init__(self, sync: "WeightSync"):
        self.sync = sync

    def abandon(self) -> None:
        """A half-written folder is never loaded; the next push writes the version again."""

    def push(self, named, weight_version: str, stats: Dict[str, float]) -> None:
        sync = self.sync
        if sync.disk_dir is None:  # servers on this machine only (config refuses others)
            sync.disk_dir = tempfile.mkdtemp(prefix="trapo_weights_")
        root = Path(sync.disk_dir)
        out = root / f"v{weight_version}"
        writer = HFCheckpointWriter(out, sync.bucket_bytes)
        hf_config = model_to_hf_config(sync.model, sync.hf_config)
        if sync.quantization == "fp8":  # the servers' Fp8Config reads it from config.json
            named = fp8.quantize_named(named, sync.fp8_block_size)
            hf_config = fp8.with_quantization_config(hf_config, sync.fp8_block_size)
        for name, t in named:
            writer.add(name, t)
            stats["tensors"] += 1
            stats["bytes"] += t.numel() * t.element_size()
        stats["buckets"] = float(len(writer.close()))
        (out / "config.json").write_text(json.dumps(hf_config, indent=2))
        sync.engine.update_weights_from_disk(str(out), weight_version)
        self._prune_versions(root, keep=out)

    def _prune_versions(self, root: Path, keep: Path) -> None:
        """Delete all but the newest ``keep_versions`` weight folders (a 32B model is 61 GiB a
        version); the one the engines just loaded is always kept."""
        versions = sorted((p for p in root.glob("v*") if p.is_dir() and p != keep),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for old in versions[max(self.sync.keep_versions - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)


class BroadcastSync:
    """``distributed``: a process group of the sync rank and every server's ranks; each tensor
    is broadcast from rank 0 after the servers were told its name, dtype and shape."""

    def __init__(self, sync: "WeightSync"):
        if not isinstance(sync.engine, BroadcastReceiver):
            raise RolloutError(f"weight_sync=distributed: the {sync.engine.name} engine cannot "
                               "receive broadcast weights (use disk)")
        self.sync = sync
        self.engine: BroadcastReceiver = sync.engine
        self._group = None
        self._members: Tuple[str, ...] = ()
        self._inflight: list = []  # replies of the bucket being broadcast
        self.rebuilds = 0  # groups formed again after the set of servers changed (metric)

    def _ensure_group(self) -> None:
        """Form the group with the live servers; when the set changed since the last sync (a
        server died), destroy the old group on both sides first — its ranks include the dead
        server's, and a broadcast would wait for them until the NCCL timeout."""
        sync = self.sync
        members = tuple(self.engine.server_urls())
        if not members:
            raise RolloutError(f"weight sync: no live server left (dead: "
                               f"{self.engine.dead_servers})")
        if self._group is not None and members == self._members:
            return
        if self._group is not None:
            self.engine.destroy_weights_update_group(GROUP_NAME)
            destroy_weight_update_group(self._group)
            self._group = None
            self.rebuilds += 1
        ranks = self.engine.weight_group_ranks()
        world = 1 + sum(ranks)
        port = sync.master_port if (sync.master_port and not self.rebuilds) else free_port()
        address = sync_address(list(members), sync.address)
        self.engine.init_weights_update_group(address, port, sync.backend, ranks, GROUP_NAME)
        self._group = init_weight_update_group(address, port, 0, world, GROUP_NAME, sync.backend,
                                               timeout_s=sync.group_timeout_s)
        self.engine.finish_init_group()
        self._members = members

    def push(self, named, weight_version: str, stats: Dict[str, float]) -> None:
        self._ensure_group()
        if self.sync.quantization == "fp8":  # fp8 weights and their scales
            named = fp8.quantize_named(named, self.sync.fp8_block_size)
        for bucket in _counted_buckets(named, self.sync.bucket_bytes, stats):
            names = [n for n, _ in bucket]
            dtypes = [_DTYPE_NAMES[t.dtype] for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            self._inflight = self.engine.start_distributed_update(names, dtypes, shapes,
                                                                  weight_version, GROUP_NAME)
            for _, t in bucket:  # one broadcast per tensor, in the order of ``names``
                t = t.to(compute_device()).contiguous()
                # fp8 as its bytes: gloo has no float8, and NCCL broadcasts a float8 tensor as
                # uint8 too, so a receiver that allocates float8_e4m3fn (SGLang) gets the same
                dist.broadcast(t.view(torch.uint8) if t.dtype == fp8.FP8 else t, src=0,
                               group=self._group)
            futures, self._inflight = self._inflight, []
            self.engine.finish_distributed_update(futures, weight_version)

    def abandon(self) -> None:
        """A server died mid-broadcast: the group holds a dead member and the live servers may
        still wait for the rest of a bucket. Tear down our end first (their receives then fail
        at once, with gloo, instead of waiting for the group timeout; NCCL has no such signal,
        so there they wait for it), collect their failed replies, then leave the group on
        their side; the next push forms a new group with the live servers only."""
        destroy_weight_update_group(self._group)
        self._group = None
        for fut in self._inflight:
            try:
                fut.result(timeout=self.sync.group_timeout_s)
            except Exception as exc:  # the dead server's reply, or a live one's failure
                logger.info("weight sync: abandoned update reply: %s", exc)
        self._inflight = []
        self.engine.destroy_weights_update_group(GROUP_NAME)
        self._members = ()
        self.rebuilds += 1

def _counted_buckets(named, bucket_bytes: int, stats: Dict[str, float]):
    for bucket in buckets(named, bucket_bytes):
        stats["buckets"] += 1
        stats["tensors"] += len(bucket)
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket


STRATEGIES = {"inprocess": InProcessSync, "disk": DiskSync, "distributed": BroadcastSync}  # keys: config.WEIGHT_SYNC_MODES


class WeightSync:
    """Pushes the trainer's weights to a rollout engine (see module docstring): every rank
    takes part in gathering the HF-named tensors; the sync rank hands them to the strategy of
    ``mode`` (:data:`STRATEGIES`) while the engine is paused."""

    def __init__(self, engine: Optional[RolloutEngine], model: ModelConfig, mode: str,
                 bucket_bytes: int = 512 * 1024**2, disk_dir: Optional[str] = None,
                 backend: Optional[str] = None, master_port: Optional[int] = None,
                 hf_config: Optional[dict] = None, address: Optional[str] = None,
                 group_timeout_s: float = 600.0, keep_versions: int = 2,
                 replicated: bool = False, quantization: str = "none",
                 fp8_block_size: Optional[List[int]] = None):
        if mode not in STRATEGIES:
            raise RolloutError(f"weight sync mode must be one of {list(STRATEGIES)}, got {mode!r}")
        self.engine, self.model, self.mode = engine, model, mode
        self.bucket_bytes = bucket_bytes
        self.disk_dir = disk_dir
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_port = master_port
        self.hf_config = hf_config  # base config.json written beside disk weights
        self.address = address
        self.group_timeout_s = group_timeout_s
        self.keep_versions = keep_versions
        if quantization not in ("none", "fp8"):
            raise RolloutError(f"rollout.quantization must be none or fp8, got {quantization!r}")
        self.quantization, self.fp8_block_size = quantization, fp8_block_size
        # data-parallel rollouts: every rank holds the whole model (TP = PP = CP = 1) and an
        # engine of its own, and fills it from its own weights — no gather, no transfer
        self.replicated = replicated
        if replicated and (engine is None or mode != "inprocess"):
            raise RolloutError("replicated weight sync needs an in-process engine on every rank")
        # only the ranks that hold an engine push
        self.strategy = STRATEGIES[mode](self) if engine is not None else None

    @property
    def rebuilds(self) -> int:
        return self.strategy.rebuilds if self.strategy is not None else 0

    def sync(self, chunks, weight_version: str) -> Dict[str, float]:
        """Collective over all trainer ranks; returns timing/size stats (on rank 0).

        A server that dies *during* the sync (between the health check and the last
        broadcast) costs one more pass, not the run: the sync rank drops it, abandons the
        half-sent version, lets the other ranks finish their gathers, and every rank syncs
        again to the servers that are left (rank 0 tells them so on the host group)."""
        t0 = time.time()
        for attempt in range(2):
            stats = {"bytes": 0.0, "tensors": 0.0, "buckets": 0.0}
            named = _stage_hf_tensors(chunks, self.model) if self.replicated \
                else hf_named_tensors(chunks, self.model)
            again = False
            if dist.get_rank() != 0 and not self.replicated:
                for _ in named:  # non-sync ranks only take part in the gathers and sends
                    pass
            else:
                again = self._push(named, weight_version, stats, retry=attempt == 0)
            if not _sync_again(again):
                break
        stats["attempts"] = float(attempt + 1)
        if dist.get_rank() != 0 and not self.replicated:
            return stats
        stats["seconds"] = time.time() - t0
        urls = self.engine.server_urls()
        if urls:  # servers that took this version; groups formed again so far
            stats["servers"] = float(len(urls))
            stats["rebuilds"] = float(self.rebuilds)
        return stats

    def _push(self, named, weight_version: str, stats: Dict[str, float], retry: bool) -> bool:
        """Push on this rank; True when a server died mid-push and the sync must run again."""
        for url in self.engine.drop_dead_servers():  # no pause, no update for those
            logger.warning("weight sync: server %s is dead; dropped", url)
        before = tuple(self.engine.server_urls())
        self.engine.pause()
        try:
            self.strategy.push(named, weight_version, stats)
            return False
        except (RuntimeError, OSError, httpx.HTTPError, RolloutError) as exc:
            self.engine.drop_dead_servers()
            left = tuple(self.engine.server_urls())
            if not retry or not left or left == before:  # not a death, or nobody left
                raise
            logger.warning("weight sync: server(s) %s died during the sync of version %s (%s: "
                           "%s); syncing it again to %d live server(s)",
                           ", ".join(u for u in before if u not in left), weight_version,
                           type(exc).__name__, str(exc)[:200], len(left))
            self.strategy.abandon()
            for _ in named:  # the other ranks' gathers and PP sends still need this rank
                pass
            return True
        finally:
            self.engine.resume()
