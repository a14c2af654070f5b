"""Next-token cross entropy for Megatron's schedules: the loss of SFT smoke runs and tests.

Contract (megatron ``calculate_per_token_loss=True``): ``loss_func(output_tensor)`` returns
``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``; the schedule divides by the
global token count, so the reported loss is a token mean over the whole step.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Tuple

import torch


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Masked sum of megatron's per-token CE (``output_tensor`` is [b, s])."""
    mask = loss_mask.to(output_tensor.dtype)
    loss_sum = (output_tensor.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def lm_forward_step(batch: Dict[str, torch.Tensor], model):
    """``forward_step`` for :func:`run_forward_backward`: tokens → per-token CE vs labels."""
    tokens = batch["tokens"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


def shift_batch(tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Make a (tokens, labels, loss_mask) micro-batch from [b, s+1] token ids."""
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones_like(tokens[:, 1:], dtype=torch.float32)}


def reduce_lm_loss(losses) -> float:
    """Token-mean loss from the metric dicts of one step (last pipeline stage)."""
    if not losses:
        return float("nan")
    total = torch.stack([d["lm loss"] for d in losses]).sum(0)
    return float(total[0] / total[1].clamp(min=1))
