"""A process group between the trainer's sync rank and inference engines, outside
``torch.distributed``'s default group (the trainer already has one; an engine is a separate
program). Built directly from a TCPStore, as SGLang's and vLLM's stateless groups are."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def stateless_group(master_address: str, master_port: int, rank: int, world_size: int,
                    backend: str = "gloo", timeout_s: float = 300.0):
    """A ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` of ``world_size`` members; rank 0 hosts the
    store. Use ``group.broadcast(tensor, root).wait()``."""
    store = dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0),
                          timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "gloo":
        return dist.ProcessGroupGloo(dist.PrefixStore("weights", store), rank, world_size)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend=nccl needs CUDA; use gloo on CPU")
        return dist.ProcessGroupNCCL(dist.PrefixStore("weights", store), rank, world_size)
    raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
