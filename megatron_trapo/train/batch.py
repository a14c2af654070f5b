"""Trajectories → Megatron micro-batches with per-token masks, built in one place.

Position k of a sequence predicts token k+1, so a token's loss sits at the position before it.
Per label position: ``expert_mask`` = 1 on expert-prefix tokens whose sample trains its prefix;
``generated_mask`` = 1 on the policy's own tokens; prompt tokens, padding and context-only
prefixes have both 0. Aggregation weights are computed over the whole step before splitting
(so the loss does not depend on the split); sequences are then divided over data-parallel
ranks (balanced by tokens) and grouped into micro-batches under a token budget (dynamic
batching; rows padded to the longest sequence of their micro-batch — or of the step, when
pipeline parallelism needs one shape).
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, TypedDict

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_trapo.algorithms.losses import aggregation_weights
from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.config import LossConfig
from megatron_trapo.models.provider import takes_packed_sequences
from megatron_trapo.platform import compute_device


class MicroBatch(TypedDict, total=False):
    """One micro-batch, the contract between this module, the loss function and the schedules.
    Per-token fields are ``[b, s]`` (padded rows) or ``[1, T]`` (packed rows), indexed by label
    position: position k carries the loss of token k+1.

    A TypedDict (NeMo-RL's choice for its loss data) rather than a dataclass: megatron's
    schedules, ``to_device`` and pipeline sends handle it as the plain dict it is."""

    tokens: torch.Tensor  # long: input token ids (pad_id on padding)
    labels: torch.Tensor  # long: the next token of each position
    position_ids: torch.Tensor  # long: restarts at 0 for each packed sequence
    expert_mask: torch.Tensor  # 0/1: expert-prefix labels flagged for the expert-token loss
    generated_mask: torch.Tensor  # 0/1: the policy's own labels (policy gradient)
    advantages: torch.Tensor  # float: the sample's group-relative advantage on each label
    old_logprobs: torch.Tensor  # float: log π_old(label) (the trainer's recompute, or rollout)
    rollout_logprobs: torch.Tensor  # float: the engine's logprobs, for TIS
    agg_weight: torch.Tensor  # float: w_t, the token's weight in Σ w·ℓ / N
    agg_norm: torch.Tensor  # float: c_t, its share of the step's normaliser N = Σ c
    entropy_weight: torch.Tensor  # float: e_t, the entropy bonus is −coef·Σ e·H / N
    sample_ids: torch.Tensor  # long: the step-wide sequence index of each position
    segment_ids: torch.Tensor  # long, packed rows: the sequence within the row (−1: padding)
    cu_seqlens: torch.Tensor  # int32, packed rows: cumulative sequence lengths (THD attention)
    max_seqlen: int  # packed rows: the longest sequence in the row


# the per-token fields every micro-batch has (packing adds segment_ids, cu_seqlens, max_seqlen)
FIELDS = ("tokens", "labels", "position_ids", "expert_mask", "generated_mask", "advantages",
          "old_logprobs", "rollout_logprobs", "agg_weight", "agg_norm", "entropy_weight",
          "sample_ids")


def to_device(batch: MicroBatch, device: Optional[torch.device] = None) -> MicroBatch:
    """The one place a micro-batch moves to where the model lives (the current CUDA device, or
    the CPU); non-tensor entries (``max_seqlen``) travel as they are. Builders make CPU
    tensors; everything after this call — forward, masks, loss, old logprobs, metrics — runs
    on the device."""
    device = device or compute_device()
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def packed_attention(batch: MicroBatch, thd: bool):
    """Megatron forward kwargs that keep packed sequences apart.

    ``thd`` (the model's core attention takes packed sequences: Transformer Engine's, or the
    local spec's SDPA, see :func:`~megatron_trapo.models.provider.takes_packed_sequences`):
    ``PackedSeqParams`` from the row's ``cu_seqlens`` (int32, on the batch's device, built by
    :func:`pack_microbatches` with the padding tail as a segment of its own, so every token of
    the row belongs to some segment); RoPE restarts per segment. Otherwise (megatron's unfused
    attention): a block-diagonal causal mask (True = masked); RoPE needs no per-sequence reset
    there, because attention between tokens of one sequence depends only on their relative
    positions.
    """
    seg = batch.get("segment_ids")
    if seg is None:
        return {}

    if thd:
        cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
        return {"packed_seq_params": PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
            max_seqlen_q=longest, max_seqlen_kv=longest)}
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [b, s, s]
    causal = torch.ones_like(same[0]).tril().bool()
    return {"attention_mask": (~(same & causal)).unsqueeze(1)}  # [b, 1, s, s]


def model_forward(model, batch: MicroBatch) -> torch.Tensor:
    """Megatron forward of one micro-batch, packed (see :func:`packed_attention`) or padded."""
    kwargs = packed_attention(batch, thd=takes_packed_sequences(model))
    return model(batch["tokens"], batch["position_ids"], kwargs.pop("attention_mask", None),
                 **kwargs)


def row_multiple(tp: int = 1, sequence_parallel: bool = False, fp8: bool = False,
                 cp: int = 1) -> int:
    """What every row's token count must be a multiple of: TP with sequence parallel (the
    scatter along the sequence splits it evenly), 2·CP with context parallel (load-balanced
    chunks), 16 with FP8 GEMMs (TE's alignment)."""
    m = tp if sequence_parallel else 1
    if cp > 1:
        m *= 2 * cp
    if fp8:
        m = m * 16 // math.gcd(m, 16)
    return m


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_sequences(trajs: Sequence[Trajectory], cfg: LossConfig) -> List[Dict[str, torch.Tensor]]:
    """One dict of 1-D tensors per trajectory (length = tokens − 1), weights included."""
    seqs = []
    for i, t in enumerate(trajs):
        ids = list(t.prompt_ids) + list(t.prefix_ids) + list(t.completion_ids)
        n = len(ids) - 1
        p, f = len(t.prompt_ids), len(t.prefix_ids)
        label_pos = torch.arange(1, n + 1)  # index of the token each position predicts
        in_prefix = (label_pos >= p) & (label_pos < p + f)
        in_completion = label_pos >= p + f
        rollout = torch.zeros(n)
        if t.completion_ids:
            rollout[p + f - 1:] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
        seqs.append({
            "tokens": torch.tensor(ids[:-1]), "labels": torch.tensor(ids[1:]),
            "position_ids": torch.arange(n),
            "expert_mask": (in_prefix & t.train_prefix).float(),
            "generated_mask": in_completion.float(),
            "response_mask": (in_prefix | in_completion).float(),
            "advantages": torch.full((n,), float(t.advantage)),
            "old_logprobs": rollout.clone(), "rollout_logprobs": rollout,
            "sample_ids": torch.full((n,), i, dtype=torch.long)})
    loss_mask = torch.cat([s["expert_mask"] + s["generated_mask"] for s in seqs])
    ids = torch.cat([s["sample_ids"] for s in seqs])
    w, c = aggregation_weights(ids, loss_mask, cfg.aggregation, cfg.max_response_length)
    if cfg.entropy_tokens == "response":  # a token mean over the step's response tokens:
        # e = N / (their count) on each, so that Σ e·H / N is that mean
        response = torch.cat([s["response_mask"] for s in seqs])
        e = response * (c.sum() / response.sum().clamp(min=1))
    else:  # the policy's own tokens, weighted as their loss
        e = torch.cat([s["generated_mask"] for s in seqs]) * w
    offset = 0
    for s in seqs:
        n = s["tokens"].numel()
        s["agg_weight"], s["agg_norm"] = w[offset:offset + n], c[offset:offset + n]
        s["entropy_weight"] = e[offset:offset + n]
        del s["response_mask"]
        offset += n
    return seqs


def split_for_rank(seqs: Sequence[dict], dp_rank: int, dp_size: int) -> List[dict]:
    """Balanced by tokens: longest first, each to the least-loaded rank (deterministic)."""
    loads = [0] * dp_size
    mine = []
    for idx in sorted(range(len(seqs)), key=lambda k: (-seqs[k]["tokens"].numel(), k)):
        r = min(range(dp_size), key=lambda q: (loads[q], q))
        loads[r] += seqs[idx]["tokens"].numel()
        if r == dp_rank:
            mine.append(seqs[idx])
    return mine


def pack_microbatches(seqs: Sequence[dict], max_tokens: int, pad_id: int = 0,
                      fixed_width: bool = False, multiple: int = 1) -> List[MicroBatch]:
    """Sequence packing: first-fit of whole sequences (longest first) into rows of at most
    ``max_tokens`` tokens, one [1, W] micro-batch per row, with ``segment_ids`` (−1 on padding)
    so that attention stays within each sequence, and ``cu_seqlens`` / ``max_seqlen`` for
    THD attention. ``W`` is rounded up to ``multiple`` (see :func:`row_multiple`);
    ``fixed_width`` pads every row to the widest row (pipeline parallelism needs one shape;
    padding to ``max_tokens`` would cost a full 16k-token row for a step of short answers).
    The padding tail is a segment of its own in ``cu_seqlens`` (varlen kernels leave rows
    outside every segment uninitialised, and 0 · NaN is NaN in the loss)."""
    bins: List[List[dict]] = []
    used: List[int] = []
    for s in sorted(seqs, key=lambda x: -x["tokens"].numel()):
        n = s["tokens"].numel()
        if _round_up(n, multiple) > max_tokens:
            raise ValueError(f"a sequence of {n} tokens exceeds max_tokens_per_microbatch="
                             f"{max_tokens}" + (f" once aligned to {multiple}" if multiple > 1
                                                else ""))
        for b, u in enumerate(used):
            if _round_up(u + n, multiple) <= max_tokens:
                bins[b].append(s)
                used[b] += n
                break
        else:
            bins.append([s])
            used.append(n)
    out = []
    widest = _round_up(max(used, default=0), multiple)
    for group, total in zip(bins, used):
        width = widest if fixed_width else _round_up(total, multiple)
        mb: MicroBatch = {}
        for key in FIELDS:
            fill = pad_id if key in ("tokens", "labels") else 0
            row = torch.full((width,), fill, dtype=group[0][key].dtype)
            row[:total] = torch.cat([s[key] for s in group])
            mb[key] = row.unsqueeze(0)
        lengths = [s["tokens"].numel() for s in group] + ([width - total] if width > total else [])
        seg = torch.full((width,), -1, dtype=torch.long)
        seg[:total] = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths[:len(group)])])
        mb["segment_ids"] = seg.unsqueeze(0)
        mb["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        mb["cu_seqlens"] = torch.tensor([0] + list(itertools.accumulate(lengths)),
                                        dtype=torch.int32)
        mb["max_seqlen"] = max(lengths)
        out.append(mb)
    return out


def make_microbatches(seqs: Sequence[dict], max_tokens: int, pad_id: int = 0,
                      fixed_shape: Optional[tuple] = None,
                      multiple: int = 1) -> List[MicroBatch]:
    """Group sequences (longest first) into padded [b, s] micro-batches with b·s ≤ max_tokens,
    ``s`` rounded up to ``multiple`` (see :func:`row_multiple`). ``fixed_shape=(b, s)`` pads
    every micro-batch to one shape (pipeline parallelism)."""
    if fixed_shape and fixed_shape[1] % multiple:
        raise ValueError(f"micro-batch width {fixed_shape[1]} is not a multiple of {multiple}")
    order = sorted(seqs, key=lambda s: -s["tokens"].numel())
    groups, current = [], []
    for s in order:
        width = _round_up(max([x["tokens"].numel() for x in current + [s]]), multiple)
        rows = len(current) + 1
        limit_rows = fixed_shape[0] if fixed_shape else None
        if current and (rows * width > max_tokens or (limit_rows and rows > limit_rows)):
            groups.append(current)
            current = []
        current.append(s)
    if current:
        groups.append(current)
    return [_pad(g, pad_id, fixed_shape, multiple) for g in groups]


def _pad(group: Sequence[dict], pad_id: int, fixed_shape: Optional[tuple],
         multiple: int) -> MicroBatch:
    rows = fixed_shape[0] if fixed_shape else len(group)
    width = fixed_shape[1] if fixed_shape else _round_up(
        max(s["tokens"].numel() for s in group), multiple)
    out = {}
    for key in FIELDS:
        proto = group[0][key]
        fill = pad_id if key in ("tokens", "labels") else 0
        t = torch.full((rows, width), fill, dtype=proto.dtype)
        for r, s in enumerate(group):
            t[r, :s[key].numel()] = s[key]
        out[key] = t
    out["position_ids"] = torch.arange(width).unsqueeze(0).expand(rows, width).contiguous()
    return out
