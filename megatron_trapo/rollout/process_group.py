"""The trainer↔engine weight-update process group, formed the way SGLang's servers form theirs.

An inference server is a separate program with its own default process group, so the group
that carries weight broadcasts is built outside ``torch.distributed``'s default group. Both
sides must agree on every store key, or they wait on each other until a timeout. SGLang's
``init_weights_update_group`` (``sglang/srt/utils/common.py:init_custom_process_group``) does:
TCP rendezvous on ``tcp://master_address:master_port`` (rank 0 hosts a TCPStore), wraps the
store in ``PrefixStore(group_name, store)``, and creates a *named* process group with
``torch.distributed``'s ``_new_process_group_helper`` (which prefixes the store again with the
group name and the device). :func:`init_weight_update_group` follows that protocol step by
step, so the trainer's rank 0 and every SGLang TP worker (rank ``rank_offset + tp_rank``)
meet under the same keys; ``tests/servers/test_weight_group.py`` forms a group with
SGLang's own function from its wheel on the other side. The helper is private API; it is the
only way to create a named, non-default group from a given store, and it is what SGLang uses.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist
from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                _world)


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, backend: str = "nccl",
                             timeout_s: Optional[float] = None):
    """Join (rank 0: host) the named group; returns a process group for
    ``torch.distributed.broadcast(tensor, src=0, group=pg)``.

    Works without a default process group (an engine-side stand-in) and beside one (the
    trainer); ranks inside the group are the group's own (0 = the trainer's sync rank).
    """
    if not group_name:
        raise ValueError("group_name must not be empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of world_size={world_size}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else dist.default_pg_timeout
    # The store that SGLang's tcp:// rendezvous makes: rank 0 hosts a TCPStore, the others
    # connect. Built directly rather than through ``rendezvous``: under torchrun
    # (TORCHELASTIC_USE_AGENT_STORE=True) ``rendezvous`` makes *every* rank a client of a store
    # it assumes torchrun's agent hosts — on this port nobody does, and the group never forms.
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                          timeout=timeout, multi_tenant=True)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                         PrefixStore(group_name, store), group_name=group_name,
                                         timeout=timeout)
    # group ranks are global ranks here (the group is its own world), as on the SGLang side
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_update_group(group) -> None:
    """Tear the group down (after a server died, before forming a new one)."""
    if group is not None:
        dist.destroy_process_group(group)
