"""This rank's pieces of the global (TP=1, unpipelined) tensors, read from megatron's own
``sharded_state_dict`` metadata: which slice of which global tensor every local parameter is
(TP splits, SwiGLU halves, pipeline layer offsets, tied output layers). Conversion, weight sync
and cross-layout tests use it instead of re-deriving megatron's slicing rules.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.utils import unwrap_model

from megatron_trapo.config import ConfigError

Shard = Tuple[torch.Tensor, tuple, tuple]  # (local view, slice into the global tensor, global shape)


def local_shards(chunks) -> Dict[str, List[Shard]]:
    """Global key (``decoder.layers.{i}.…`` with the real layer index) → this rank's shards.

    The local views alias the parameters: writing into them writes the model.
    """
    by_key: Dict[str, List[Shard]] = defaultdict(list)
    for chunk in chunks:
        sd = unwrap_model(chunk).sharded_state_dict()
        apply_factories(sd)
        for sh in nested_values(sd):
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state"):
                continue
            slices = sh.global_slice()
            key = sh.key
            if sh.prepend_axis_num:
                if sh.prepend_axis_num != 1 or not key.startswith("decoder.layers."):
                    raise ConfigError(f"cannot map sharded tensor {key} "
                                      f"(prepend_axis_num={sh.prepend_axis_num})")
                key = f"decoder.layers.{slices[0]}.{key[len('decoder.layers.'):]}"
                slices = slices[1:]
            by_key[key].append((sh.data, slices, tuple(sh.global_shape[sh.prepend_axis_num:])))
    return by_key


def whole_view(items: List[Shard]) -> Optional[torch.Tensor]:
    """The global tensor as one view of the model's storage, when this rank's shards are the
    pieces of a single contiguous parameter in the global layout (TP = 1: SwiGLU's gate and up
    halves of ``linear_fc1``); else None. The weight sync then hands the engine views of the
    trainer's tensor instead of assembling a copy (SmolLM2-135M: 0.21 GB)."""
    view = items[0][0]
    shape = items[0][2]
    strides = torch.empty(shape, device="meta").stride()
    starts = [[s.start or 0 for s in slices] for _, slices, _ in items]
    base = view.storage_offset() - sum(a * b for a, b in zip(starts[0], strides))
    if base < 0 or sum(v.numel() for v, _, _ in items) != torch.Size(shape).numel():
        return None
    for (v, slices, _), start in zip(items, starts):
        if v.untyped_storage().data_ptr() != view.untyped_storage().data_ptr() or \
                v.dtype != view.dtype or v.stride() != strides or \
                v.storage_offset() != base + sum(a * b for a, b in zip(start, strides)):
            return None
    if (base + torch.Size(shape).numel()) * view.element_size() > view.untyped_storage().nbytes():
        return None
    return torch.as_strided(view, shape, strides, base)


def _grad_view(view: torch.Tensor, params: List[torch.nn.Parameter]) -> torch.Tensor:
    """The ``main_grad`` (or ``grad``) region that corresponds to ``view`` of a parameter."""
    ptr = view.untyped_storage().data_ptr()
    off = view.storage_offset()
    for p in params:
        if p.untyped_storage().data_ptr() == ptr and p.storage_offset() <= off < p.storage_offset() + p.numel():
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is None:
                return torch.zeros_like(view)
            return torch.as_strided(grad, view.size(), view.stride(),
                                    grad.storage_offset() + off - p.storage_offset())
    raise ValueError("a sharded tensor does not view any parameter of the model")


def local_pieces(chunks, source: str = "param") -> Iterator[Tuple[str, tuple, tuple, torch.Tensor]]:
    """(key, slice, global shape, local values) of parameters or of their gradients."""
    if source not in ("param", "grad"):
        raise ValueError(f"source must be 'param' or 'grad', got {source!r}")
    params = [p for c in chunks for p in c.parameters()]
    for key, items in local_shards(chunks).items():
        for view, slices, shape in items:
            data = view if source == "param" else _grad_view(view, params)
            yield key, slices, shape, data


def gather_global(chunks, source: str = "param") -> Dict[str, torch.Tensor]:
    """Every global tensor, assembled on every rank from all ranks' pieces (object all-gather:
    for tests and small models, not a weight-sync path for large ones)."""
    pieces = [(k, s, shape, d.detach().float().cpu().clone())
              for k, s, shape, d in local_pieces(chunks, source)]
    world = torch.distributed.get_world_size()
    gathered: List = [None] * world
    torch.distributed.all_gather_object(gathered, pieces)
    out: Dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for key, slices, shape, data in rank_pieces:
            if key not in out:
                out[key] = torch.full(shape, float("nan"))
            out[key][slices] = data
    return out


@torch.no_grad()
def global_tensors(chunks) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, global tensor) of a TP=1/PP=1 model, where every shard is local."""
    for key, items in local_shards(chunks).items():
        full = torch.empty(items[0][2], dtype=items[0][0].dtype)
        for view, slices, _ in items:
            full[slices] = view
        yield key, full
