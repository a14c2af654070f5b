"""Process groups: validate a parallel layout, then initialise torch.distributed and Megatron.

Validation runs before any process group exists, so a bad layout fails in a second with a
message that names the numbers instead of hanging in a collective or failing deep inside
megatron-core.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_trapo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_trapo.models.provider import have_transformer_engine
from megatron_trapo.platform import activate
from megatron_trapo.platform.cpu_threads import confine_openmp_to_main_thread


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension, data parallel included."""

    world_size: int
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    sequence_parallel: bool


def validate_layout(parallel: ParallelConfig, world_size: int,
                    model: Optional[ModelConfig] = None, seq_length: Optional[int] = None) -> Layout:
    """Check that ``parallel`` fits ``world_size`` processes and ``model``; return the layout."""
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    vpp = parallel.virtual_pipeline_model_parallel_size
    mp = tp * pp * cp
    if world_size % mp != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) = {mp}")
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("sequence_parallel=True requires tensor_model_parallel_size > 1 (got 1)")
    if vpp is not None:
        if vpp < 1:
            raise ConfigError(f"virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
        if pp < 2:
            raise ConfigError(
                f"virtual_pipeline_model_parallel_size={vpp} requires pipeline_model_parallel_size"
                f" >= 2 (got {pp})")
    if model is not None:
        heads, groups = model.num_attention_heads, model.query_groups
        if heads % tp != 0:
            raise ConfigError(f"num_attention_heads={heads} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        if groups % tp != 0:
            raise ConfigError(f"num_query_groups={groups} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        if model.ffn_hidden_size % tp != 0:
            raise ConfigError(f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        stages = pp * (vpp or 1)
        if model.num_layers % stages != 0:
            raise ConfigError(
                f"num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size "
                f"({pp}) x virtual_pipeline_model_parallel_size ({vpp or 1}) = {stages}")
        if model.fp8 is not None and not torch.cuda.is_available():
            raise ConfigError(f"model.fp8={model.fp8!r} needs Transformer Engine on a CUDA GPU; "
                              "this machine has no CUDA device (set model.fp8=null on CPU)")
    if cp > 1 and not _have_te_attention():
        raise ConfigError(
            f"context_parallel_size={cp} needs Transformer Engine's attention on CUDA GPUs "
            "(megatron-core's local DotProductAttention has no context parallelism); "
            "this machine has no Transformer Engine/CUDA, use context_parallel_size=1")
    if seq_length is not None and cp > 1 and seq_length % (2 * cp) != 0:
        raise ConfigError(f"sequence length {seq_length} is not divisible by 2 x "
                          f"context_parallel_size = {2 * cp}")
    return Layout(world_size=world_size, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=world_size // mp,
                  sequence_parallel=parallel.sequence_parallel)


def _have_te_attention() -> bool:
    return have_transformer_engine()


def _backend(parallel: ParallelConfig) -> str:
    if parallel.distributed_backend != "auto":
        if parallel.distributed_backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("parallel.distributed_backend=nccl needs CUDA; use gloo or auto")
        return parallel.distributed_backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_distributed(parallel: ParallelConfig, model: Optional[ModelConfig] = None,
                           seed: int = 1234, seq_length: Optional[int] = None) -> Layout:
    """Initialise torch.distributed (from torchrun's env) and Megatron's parallel state.

    Activates the CPU layer first when there is no GPU. Safe to call in a single process
    without torchrun: it then forms a world of one.
    """
    # lazy: megatron-core takes ~3 s to import; the CLI, launcher and servers use this module's
    # layout and port helpers
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    layout = validate_layout(parallel, world_size, model, seq_length)
    device = activate()
    if device == "cpu" and threading.current_thread() is threading.main_thread():
        # before gloo's threads exist: a team on one of them slows every parallel region here
        confine_openmp_to_main_thread()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if world_size == 1 else "29500")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=_backend(parallel), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        create_gloo_process_groups=True,
    )
    model_parallel_cuda_manual_seed(seed)
    global _HOST_GROUP
    _HOST_GROUP = torch.distributed.new_group(
        backend="gloo", timeout=datetime.timedelta(minutes=parallel.rollout_wait_timeout_minutes))
    return layout


_HOST_GROUP = None


def host_group():
    """A gloo group of every rank, with ``parallel.rollout_wait_timeout_minutes``: for Python
    objects rank 0 makes while the others wait (rollouts, evaluation results). On NCCL such a
    wait would sit in a collective under the NCCL watchdog's timeout, and an object broadcast
    would stage through the GPU for nothing."""
    if _HOST_GROUP is None:
        raise RuntimeError("initialize_distributed() has not run")
    return _HOST_GROUP


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` of rank ``src`` on every rank of ``group`` (default: the host group, for what
    rank 0 makes while the others wait)."""
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src,
                                            group=host_group() if group is None else group)
    return holder[0]


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group."""
    # lazy: megatron-core takes ~3 s to import (see initialize_distributed)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now (for rendezvous, servers, routers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
