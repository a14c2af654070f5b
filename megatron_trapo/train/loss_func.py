"""The TRAPO loss as Megatron's ``loss_func`` — a thin adapter over ``algorithms/losses.py``.

Contract with Megatron (models are built with ``calculate_per_token_loss=True``)::

    loss_func(output_tensor) -> (loss, num_tokens, metrics)

- ``loss = (Σ_t w_t·ℓ_t − coef·Σ_t e_t·H_t) / N``: ``ℓ_t`` the per-token loss, ``w_t`` the
  token's aggregation weight (``batch["agg_weight"]``), ``H_t`` its entropy and ``e_t`` its
  entropy weight (``batch["entropy_weight"]``, RL methods only; see ``loss.entropy_tokens``),
  ``N`` the *step's* normaliser ``Σ c_t`` over every micro-batch and every data-/context-
  parallel rank, computed once per step by :func:`global_normaliser` before the schedule runs.
- ``num_tokens = 0``: the loss is already globally normalised. The schedule sums gradients over
  micro-batches, megatron's DDP sums them over DP×CP (per-token mode reduces with SUM), and
  ``finalize_model_grads`` divides only by a positive global count, so the gradient is exactly
  that of ``Σ_all w·ℓ / N`` — the same however whole sequences are split over micro-batches,
  DP, CP, TP or PP ranks (see ``aggregation_weights`` for the three modes).
- ``metrics``: name → ``tensor([numerator, denominator])``, summed over micro-batches and
  DP×CP by :func:`reduce_loss_metrics`; names ending in ``_max`` are maxima.

The micro-batch's fields, their shapes and meanings are :class:`megatron_trapo.train.batch.
MicroBatch`; prompt tokens, padding and unflagged prefix tokens have both masks 0.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state as ps

from megatron_trapo.algorithms import losses as L
from megatron_trapo.algorithms.methods import clip_range, method
from megatron_trapo.config import LossConfig
from megatron_trapo.platform.distributed import broadcast_object
from megatron_trapo.train.batch import MicroBatch, model_forward
from megatron_trapo.train.logprobs import (fused_output_logprobs_entropy,
                                           vocab_parallel_logprobs_entropy)
from megatron_trapo.train.output_layer import hidden_states_out, output_weight


def token_losses(cfg: LossConfig, logprobs: torch.Tensor, entropy: torch.Tensor,
                 batch: MicroBatch, old_is_current: bool = False,
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token loss of the configured mode, and its metric numerators/denominators.
    ``old_is_current``: the step is strictly on-policy and π_old is the current policy,
    ``logprobs.detach()`` (``batch["old_logprobs"]`` is not read)."""
    m = method(cfg.loss_mode)
    zeros = torch.zeros_like(logprobs)
    expert = batch["expert_mask"].float() if m.expert_loss != "none" else zeros
    generated = batch["generated_mask"].float() if m.policy_gradient else zeros
    adv = batch.get("advantages")
    adv = zeros if adv is None else adv.float()

    loss = torch.zeros_like(logprobs)
    expert_adv = torch.ones_like(adv) if m.expert_advantage == "one" else adv
    expert_loss = L.expert_token_loss(m.expert_loss, cfg, logprobs, expert_adv)
    if expert_loss is not None:
        loss = loss + expert * expert_loss

    metrics: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        n_exp = expert.sum()
        p = logprobs.detach().exp()
        metrics["expert/tokens"] = torch.stack([n_exp, torch.zeros_like(n_exp)])
        metrics["expert/outside_trust_region"] = torch.stack(
            [((p < cfg.trust_region_alpha).float() * expert).sum(), n_exp])
        metrics["expert/p_mean"] = torch.stack([(p * expert).sum(), n_exp])
        metrics["expert/nll"] = torch.stack([(-logprobs.detach() * expert).sum(), n_exp])

    if m.policy_gradient:
        old = logprobs.detach() if old_is_current else batch["old_logprobs"].float()
        low, high = clip_range(m, cfg)
        pg = L.policy_gradient_loss(logprobs, old, adv, low, high)
        tis = None
        if cfg.tis_cap and batch.get("rollout_logprobs") is not None:  # 0 / null: off
            tis = L.tis_weights(old, batch["rollout_logprobs"].float(), cfg.tis_cap)
            pg = pg * tis
        loss = loss + cfg.rl_weight * generated * pg
        with torch.no_grad():
            n_gen = generated.sum()
            ratio = (logprobs.detach() - old).exp()
            zero = torch.zeros_like(n_gen)
            metrics["pg/tokens"] = torch.stack([n_gen, zero])
            metrics["pg/ratio_mean"] = torch.stack([(ratio * generated).sum(), n_gen])
            # ratio ≥ 0 and the mask is 0/1: the masked max is 0 when no token is generated
            # (no data-dependent branch: on a GPU that would be a host synchronisation)
            metrics["pg/ratio_max"] = torch.stack([(ratio * generated).max(), zero])
            clipped = L.clipped_mask(logprobs.detach(), old, adv, low, high).float()
            metrics["pg/clip_frac"] = torch.stack([(clipped * generated).sum(), n_gen])
            metrics["pg/entropy"] = torch.stack([(entropy.detach() * generated).sum(), n_gen])
            rollout = batch.get("rollout_logprobs")
            if rollout is not None:  # the engine's log p vs the trainer's, same weights
                delta = logprobs.detach() - rollout.float()
                metrics["pg/rollout_logprob_gap"] = torch.stack(
                    [(delta.abs() * generated).sum(), n_gen])
                # k3 = r − 1 − log r, r = π_train/π_rollout on the engine's own samples: an
                # unbiased, non-negative estimate of KL(π_rollout ‖ π_train) per token
                k3 = delta.exp() - 1 - delta
                metrics["pg/rollout_k3"] = torch.stack([(k3 * generated).sum(), n_gen])
            if tis is not None:
                metrics["pg/tis_weight_mean"] = torch.stack([(tis * generated).sum(), n_gen])
                metrics["pg/tis_weight_max"] = torch.stack([(tis * generated).max(), zero])
                metrics["pg/tis_capped_frac"] = torch.stack(
                    [((tis >= cfg.tis_cap).float() * generated).sum(), n_gen])
    return loss, metrics


def token_logprobs_entropy(output: torch.Tensor, weight: Optional[torch.Tensor],
                           labels: torch.Tensor, chunk_size: Optional[int]
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy) per token from the model's output: vocab-sharded logits, or
    with ``weight`` the output layer's input (the fused path)."""
    if weight is not None:
        return fused_output_logprobs_entropy(output, weight, labels, chunk_size)
    return vocab_parallel_logprobs_entropy(output, labels, chunk_size)


def trapo_loss_func(cfg: LossConfig, batch: MicroBatch, normaliser: float,
                    old_is_current: bool, weight: Optional[torch.Tensor],
                    output_tensor: torch.Tensor):
    """Megatron ``loss_func``; see the module docstring for the contract. ``weight``: the
    output layer's, when ``output_tensor`` is its input (``loss.fused_output_layer``)."""
    logprobs, entropy = token_logprobs_entropy(output_tensor, weight, batch["labels"],
                                               cfg.logprob_chunk_size)
    per_token, metrics = token_losses(cfg, logprobs, entropy, batch, old_is_current)
    weighted = (per_token * batch["agg_weight"].float()).sum()
    if method(cfg.loss_mode).policy_gradient:  # the entropy bonus, on its own weights
        weighted = weighted - cfg.entropy_coef * (entropy * batch["entropy_weight"].float()).sum()
    loss = weighted / normaliser
    metrics["loss"] = torch.stack([loss.detach(), torch.zeros_like(loss.detach())])
    return loss, torch.zeros((), dtype=torch.int, device=loss.device), metrics


def make_forward_step(cfg: LossConfig, normaliser: float, old_is_current: bool = False
                      ) -> Callable:
    """A ``forward_step(batch, model)`` for :func:`run_forward_backward` with the TRAPO loss
    (``old_is_current``: see :func:`token_losses`)."""

    def forward_step(batch, model):
        weight = output_weight(model) if cfg.fused_output_layer else None
        with hidden_states_out(model, enabled=weight is not None):
            output = model_forward(model, batch)
        return output, partial(trapo_loss_func, cfg, batch, normaliser, old_is_current, weight)

    return forward_step


def global_normaliser(microbatches: Sequence[MicroBatch]) -> float:
    """N = Σ c_t over this step's micro-batches on every data-/context-parallel rank.

    Computed from the CPU micro-batches before they move to the GPU, over megatron's gloo
    twin of the DP×CP group: a Python float is needed before the schedule starts, and this
    way getting it costs no device synchronisation."""
    local = torch.zeros((), dtype=torch.float64)
    for mb in microbatches:
        local += mb["agg_norm"].double().sum().cpu()
    torch.distributed.all_reduce(local, group=ps.get_data_parallel_group_gloo(
        with_context_parallel=True))
    value = float(local)
    if value <= 0:
        raise ValueError("the step has no loss tokens (global normaliser is 0)")
    return value


def reduce_loss_metrics(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Sum (or max) the loss function's metrics over micro-batches and DP×CP ranks; the result
    is broadcast from the last pipeline stage so every rank returns the same dict."""
    result: Dict[str, float] = {}
    if ps.is_pipeline_last_stage():
        keys = sorted({k for out in outputs for k in out})
        group = ps.get_data_parallel_group(with_context_parallel=True)
        for key in keys:
            stacked = torch.stack([out[key].double() for out in outputs if key in out])
            if key.endswith("_max"):
                value = stacked[:, 0].max().reshape(1)
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
                result[key] = float(value)
            else:
                pair = stacked.sum(0)
                torch.distributed.all_reduce(pair, group=group)
                result[key] = float(pair[0] / pair[1]) if pair[1] > 0 else float(pair[0])
    return broadcast_object(result, src=ps.get_pipeline_model_parallel_last_rank(),
                            group=ps.get_pipeline_model_parallel_group())
