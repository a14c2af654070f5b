"""Training checkpoints with ``megatron.core.dist_checkpointing`` (torch_dist format).

A checkpoint holds the model, the optimizer, the LR scheduler, every rank's RNG states and the
trainer's own state (counters, data position, sampler state — any JSON-able dict). Tensors are
saved as sharded tensors keyed by their global names, so a checkpoint written at one TP/PP/VPP
layout loads at another; RNG states are restored only when the layout is unchanged.

Layout on disk (Megatron-LM's, so its tools recognise it)::

    ROOT/latest_checkpointed_iteration.txt     # written last, atomically
    ROOT/iter_0000010/                         # dist_checkpointing files + trapo_meta.json

Saves are atomic: everything is written to ``ROOT/.tmp_iter_…`` and renamed into place on rank
0 only after every rank finished; the "latest" file is replaced with ``os.replace``. A save
killed half-way leaves a stray temporary folder and the previous "latest" intact.

Note: any script that saves must run under ``if __name__ == "__main__":`` — the torch_dist
writer starts a spawn-based Manager that re-imports ``__main__``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model

from megatron_trapo.train.optimizer import init_optimizer_state, untie_optimizer_steps

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "trapo_meta.json"


def checkpoint_optimizer_metadata(cfg) -> dict:
    """:func:`optimizer_metadata` for a ``CheckpointConfig``."""
    return optimizer_metadata(cfg.distrib_optim_fully_reshardable_mem_efficient)


def optimizer_metadata(mem_efficient: bool = True) -> Dict[str, Any]:
    """megatron's ``metadata`` for the distributed optimizer's sharded state: always
    ``fully_reshardable`` (model space: a checkpoint resumes at another TP/PP/DP layout).

    ``mem_efficient`` (Megatron-LM's ``--distrib-optim-fully-reshardable-mem-efficient``)
    gathers the state to DP rank 0 over gloo (host memory) instead of all-gathering it over
    NCCL on every DP rank, which at 7B with DP=2 costs ~11 GiB of GPU memory per rank during a
    save. (megatron's ``dp_reshardable`` is not offered: with it the Adam step counts do not
    come back on load — measured, resume not exact.)
    """
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": mem_efficient}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match what is being loaded."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration named by ROOT's "latest" file, or None when there is none."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold an iteration number: {text!r}")
    return int(text)


def _model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _layout() -> Dict[str, int]:
    return {
        "world_size": torch.distributed.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 0,
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(states: List[Any]):
    # Every rank's state, gathered; rank 0 writes it once (replica_id != 0 elsewhere).
    return ShardedObject("rng_state", states, (1,), (0,),
                         replica_id=torch.distributed.get_rank())


def save_checkpoint(root: str | Path, iteration: int, chunks: Sequence[torch.nn.Module],
                    optimizer=None, scheduler=None, trainer_state: Optional[dict] = None,
                    config: Optional[dict] = None, keep_last: Optional[int] = None,
                    optim_metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save model (+ optimizer, scheduler, RNG, trainer state) for ``iteration``; atomic.
    ``optim_metadata``: see :func:`optimizer_metadata` (default: fully reshardable, gathered
    over gloo); it is recorded in the checkpoint and used again when loading."""
    optim_metadata = optim_metadata or optimizer_metadata()

    dist = torch.distributed
    rank = dist.get_rank()
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp_iter_{iteration:07d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()

    state = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        init_optimizer_state(optimizer)
        optim = optimizer.sharded_state_dict(state, is_loading=False, metadata=optim_metadata)
        if optim is not None:  # None on DP ranks > 0 with the gloo gather: rank 0 writes it
            state["optimizer"] = optim
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["trainer_state"] = json.dumps(trainer_state or {})
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _rng_state())
    state["rng_state"] = _rng_sharded_object(gathered)

    dist_checkpointing.save(state, str(tmp),
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    dist.barrier()
    if rank == 0:
        meta = {"iteration": iteration, "layout": _layout(), "config": config or {},
                "has_optimizer": optimizer is not None, "has_scheduler": scheduler is not None,
                "optim_metadata": optim_metadata if optimizer is not None else None}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / (LATEST_FILE + ".tmp")
        latest_tmp.write_text(str(iteration))
        with open(latest_tmp) as f:
            os.fsync(f.fileno())
        os.replace(latest_tmp, root / LATEST_FILE)
        if keep_last:
            _prune(root, keep_last, protect=iteration)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int, protect: int) -> None:
    iters = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for it in iters[:-keep_last]:
        if it != protect:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def read_meta(ckpt_dir: str | Path) -> Dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a complete megatron_trapo checkpoint "
                              f"(no {META_FILE})")
    return json.loads(path.read_text())


def load_checkpoint(root: str | Path, chunks: Sequence[torch.nn.Module], optimizer=None,
                    scheduler=None, iteration: Optional[int] = None,
                    load_rng: bool = True, refresh_optimizer=None) -> Dict[str, Any]:
    """Load into ``chunks`` (+ optimizer/scheduler when given) from ROOT's latest or ``iteration``.

    Returns ``{"iteration", "trainer_state", "rng_restored", "layout"}``. Loading at a different
    TP/PP layout reshards; RNG states are then left as they are (``rng_restored=False``).
    ``refresh_optimizer``: an optimizer whose state is *not* loaded (fine-tuning from weights)
    but whose fp32 main parameters must be refreshed from the loaded weights.
    """
    root = Path(root)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"no {LATEST_FILE} in {root}: nothing to load")
    ckpt = iteration_dir(root, iteration)
    meta = read_meta(ckpt)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{ckpt} holds no optimizer state; load the model only "
                              "(e.g. for fine-tuning from a converted checkpoint)")
    if scheduler is not None and not meta.get("has_scheduler"):
        raise CheckpointError(f"{ckpt} holds no scheduler state")

    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        init_optimizer_state(optimizer)
        # the format it was saved in (checkpoints from before this was recorded: the former
        # fixed fully_reshardable, all-gathered)
        saved = meta.get("optim_metadata") or optimizer_metadata(mem_efficient=False)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                            metadata=saved)
    same_layout = meta["layout"] == _layout()
    if load_rng and same_layout:
        sharded["rng_state"] = _rng_sharded_object([None] * torch.distributed.get_world_size())
    loaded = dist_checkpointing.load(sharded, str(ckpt), strict=StrictHandling.ASSUME_OK_UNEXPECTED)

    if len(chunks) == 1:
        unwrap_model(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        untie_optimizer_steps(optimizer)
    elif refresh_optimizer is not None:
        refresh_optimizer.reload_model_params()
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rng_restored = False
    if "rng_state" in sharded:
        _set_rng_state(loaded["rng_state"][torch.distributed.get_rank()])
        rng_restored = True
    return {"iteration": iteration, "trainer_state": json.loads(loaded.get("trainer_state", "{}")),
            "rng_restored": rng_restored, "layout": meta["layout"]}
