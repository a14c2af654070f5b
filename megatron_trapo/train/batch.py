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

from typing import Dict, List, Optional, Sequence

import torch

from megatron_trapo.algorithms.losses import aggregation_weights
from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.config import LossConfig

FIELDS = ("tokens", "labels", "position_ids", "expert_mask", "generated_mask", "advantages",
          "old_logprobs", "rollout_logprobs", "agg_weight", "agg_norm", "sample_ids")


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
            "advantages": torch.full((n,), float(t.advantage)),
            "old_logprobs": rollout.clone(), "rollout_logprobs": rollout,
            "sample_ids": torch.full((n,), i, dtype=torch.long)})
    loss_mask = torch.cat([s["expert_mask"] + s["generated_mask"] for s in seqs])
    ids = torch.cat([s["sample_ids"] for s in seqs])
    w, c = aggregation_weights(ids, loss_mask, cfg.aggregation, cfg.max_response_length)
    offset = 0
    for s in seqs:
        n = s["tokens"].numel()
        s["agg_weight"], s["agg_norm"] = w[offset:offset + n], c[offset:offset + n]
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


def make_microbatches(seqs: Sequence[dict], max_tokens: int, pad_id: int = 0,
                      fixed_shape: Optional[tuple] = None) -> List[Dict[str, torch.Tensor]]:
    """Group sequences (longest first) into padded [b, s] micro-batches with b·s ≤ max_tokens.
    ``fixed_shape=(b, s)`` pads every micro-batch to one shape (pipeline parallelism)."""
    order = sorted(seqs, key=lambda s: -s["tokens"].numel())
    groups, current = [], []
    for s in order:
        width = max([x["tokens"].numel() for x in current + [s]])
        rows = len(current) + 1
        limit_rows = fixed_shape[0] if fixed_shape else None
        if current and (rows * width > max_tokens or (limit_rows and rows > limit_rows)):
            groups.append(current)
            current = []
        current.append(s)
    if current:
        groups.append(current)
    return [_pad(g, pad_id, fixed_shape) for g in groups]


def _pad(group: Sequence[dict], pad_id: int, fixed_shape: Optional[tuple]) -> Dict[str, torch.Tensor]:
    rows = fixed_shape[0] if fixed_shape else len(group)
    width = fixed_shape[1] if fixed_shape else max(s["tokens"].numel() for s in group)
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
