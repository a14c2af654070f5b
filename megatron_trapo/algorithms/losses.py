"""TRAPO's token-level losses, advantages and aggregation weights — pure torch, no process groups.

Every loss takes and returns per-token tensors of the input's shape; masking, aggregation and
parallel plumbing live in :mod:`megatron_trapo.train.loss_func`. Notation: ``logprobs`` are the
current policy's log p of the target tokens, ``p = exp(logprobs)``, ``sg`` is stop-gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megatron_trapo.config import AGGREGATIONS  # the one list of aggregation modes


def trsft_loss(logprobs: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Trust-region SFT: ``-p / max(sg(p), alpha)``.

    Its gradient w.r.t. ``logprobs`` is −1 inside the trust region (p ≥ α, the NLL gradient)
    and −p/α outside (the attenuated, mode-seeking −∇p/α). α = 0 is plain SFT, α = 1 is −p.
    The forward value is not the NLL; report the NLL separately.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"trust_region_alpha must be in [0, 1], got {alpha}")
    # In log space, −exp(lp − max(sg(lp), log α)), so that p underflowing to 0 cannot give 0/0.
    floor = math.log(alpha) if alpha > 0 else float("-inf")
    return -(logprobs - logprobs.detach().clamp(min=floor)).exp()


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Plain NLL, −log p."""
    return -logprobs


def policy_gradient_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, clip_low: Optional[float] = None,
                         clip_high: Optional[float] = None) -> torch.Tensor:
    """−A·ratio with ratio = exp(logprobs − old_logprobs); with clip bounds the PPO objective
    max(−A·ratio, −A·clip(ratio, 1−clip_low, 1+clip_high)). A bound left None is not clipped."""
    ratio = (logprobs - old_logprobs).exp()
    loss = -advantages * ratio
    if clip_low is None and clip_high is None:
        return loss
    low = 1.0 - clip_low if clip_low is not None else None
    high = 1.0 + clip_high if clip_high is not None else None
    clipped = -advantages * ratio.clamp(min=low, max=high)
    return torch.maximum(loss, clipped)


def clipped_mask(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 clip_low: Optional[float], clip_high: Optional[float]) -> torch.Tensor:
    """Tokens whose PPO gradient is zeroed by clipping (for the clip-fraction metric)."""
    ratio = (logprobs - old_logprobs).exp()
    out = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_high is not None:
        out |= (advantages > 0) & (ratio > 1.0 + clip_high)
    if clip_low is not None:
        out |= (advantages < 0) & (ratio < 1.0 - clip_low)
    return out


def luffy_shaping_loss(logprobs: torch.Tensor, advantages: torch.Tensor,
                       gamma: float = 0.1) -> torch.Tensor:
    """LUFFY's policy shaping on off-policy tokens: −A·f(p), f(p) = p / (p + γ)."""
    p = logprobs.exp()
    return -advantages * p / (p + gamma)


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """A = r − mean of its group of ``group_size`` consecutive samples (÷ (std + eps) optionally).

    All-correct and all-wrong groups get A = 0 and are kept (the paper's choice).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"{group_size}")
    groups = rewards.float().view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling against the rollout engine: min(exp(old − rollout), C).

    Corrects the train/inference mismatch (the engine's logprobs differ from the trainer's for
    the same weights); a constant, so it carries no gradient.
    """
    return (old_logprobs - rollout_logprobs).exp().clamp(max=cap).detach()


def aggregation_weights(sample_ids: torch.Tensor, loss_mask: torch.Tensor, mode: str,
                        max_response_length: Optional[int] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token (weight w, normaliser share c) such that the step loss is Σ w·ℓ / Σ c.

    - ``token_mean``: w = 1, c = 1 — the mean over every loss token of the step;
    - ``seq_mean_token_mean``: w = c = 1/n_s — the mean over sequences of their token mean;
    - ``constant``: w = 1/L_max, c = 1/n_s — the mean over sequences of (token sum / L_max),
      the paper's (verl "seq-mean-token-sum-norm") normalisation.
    n_s is the number of loss tokens of sequence s. Both sums are additive over tokens, so the
    step loss does not depend on how whole sequences are split over micro-batches or ranks
    (compute these weights before splitting, when sequences are whole).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation={mode!r} is not one of {list(AGGREGATIONS)}")
    mask = loss_mask.float()
    if mode == "token_mean":
        return mask, mask.clone()
    ids = sample_ids.long().flatten()
    flat = mask.flatten()
    counts = torch.zeros(int(ids.max()) + 1 if ids.numel() else 0).index_add_(0, ids, flat)
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    per_token = (inv[ids] * flat).view_as(mask)
    if mode == "seq_mean_token_mean":
        return per_token, per_token.clone()
    if not max_response_length:
        raise ValueError("aggregation='constant' needs max_response_length (L_max)")
    return mask / float(max_response_length), per_token


def expert_token_loss(kind: str, cfg, logprobs: torch.Tensor,
                      advantages: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-token loss of expert tokens (before their mask) for a method's ``expert_loss``
    (``trsft`` | ``sft`` | ``luffy_shaping`` | ``none`` → None). ``cfg``: the LossConfig."""
    if kind == "trsft":
        return cfg.sft_weight * trsft_loss(logprobs, cfg.trust_region_alpha)
    if kind == "sft":
        return cfg.sft_weight * sft_loss(logprobs)
    if kind == "luffy_shaping":
        return cfg.rl_weight * luffy_shaping_loss(logprobs, advantages, cfg.luffy.gamma)
    if kind == "none":
        return None
    raise ValueError(f"unknown expert loss {kind!r}")
