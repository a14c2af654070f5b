"""Per-token log-probabilities and entropies from vocab-parallel logits, fused and chunked.

Megatron's output layer leaves logits sharded over the vocabulary across tensor-parallel ranks:
``[..., V/TP]`` (sequence-parallel runs gather the sequence first, so every TP rank holds all
tokens; context-parallel runs shard tokens, which a per-token function does not mind). This
autograd function all-reduces the max and the sum of exponentials over the TP group, takes each
target's logit from the rank that owns it, and returns ``log p(target)`` and the entropy of the
full distribution. Its backward is written by hand and recomputes the softmax chunk by chunk.

Memory: the input logits are never modified (megatron's ``vocab_parallel_cross_entropy``
subtracts the max in place, which breaks any other op that saved them) and the full-vocabulary
softmax is never built: besides the gradient itself, the forward holds two ``[chunk, V/TP]``
fp32 buffers at a time and the backward one (fp32 logits; two for bf16).

Gradients, with p the softmax, z the logits, H the entropy:
    ∂ log p_y / ∂z_j = 1[j = y] − p_j
    ∂ H / ∂z_j       = −p_j (log p_j + H)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _tp_group():
    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_group()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int, group):
        tokens, local_vocab = logits.shape
        rank = dist.get_rank(group) if group is not None else 0
        vocab_start = rank * local_vocab
        logz = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        logprobs = torch.empty_like(logz)
        entropy = torch.empty_like(logz)
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            z = logits[start:end]
            zmax = _all_reduce(z.max(dim=-1).values.float(), dist.ReduceOp.MAX, group)
            shifted = z.to(torch.float32, copy=True).sub_(zmax.unsqueeze(-1))  # buffer 1
            local_t = targets[start:end] - vocab_start
            owned = (local_t >= 0) & (local_t < local_vocab)
            picked = shifted.gather(-1, local_t.clamp(0, local_vocab - 1).unsqueeze(-1))
            target_shifted = torch.where(owned, picked.squeeze(-1), torch.zeros_like(zmax))
            exp = shifted.exp()  # buffer 2
            sum_exp = exp.sum(-1)
            sum_exp_shifted = exp.mul_(shifted).sum(-1)
            del exp, shifted
            stats = _all_reduce(torch.stack([sum_exp, sum_exp_shifted, target_shifted]),
                                dist.ReduceOp.SUM, group)
            sum_exp, sum_exp_shifted, tgt = stats
            log_sum = sum_exp.log()
            logz[start:end] = log_sum + zmax
            logprobs[start:end] = tgt - log_sum
            entropy[start:end] = log_sum - sum_exp_shifted / sum_exp
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.chunk_size, ctx.group, ctx.vocab_start = chunk_size, group, vocab_start
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, targets, logz, entropy = ctx.saved_tensors
        tokens, local_vocab = logits.shape
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(logz)
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(logz)
        grad = torch.empty_like(logits)
        fp32 = logits.dtype == torch.float32
        for start in range(0, tokens, ctx.chunk_size):
            end = min(start + ctx.chunk_size, tokens)
            g_lp = grad_logprobs[start:end].float().unsqueeze(-1)
            g_h = grad_entropy[start:end].float().unsqueeze(-1)
            # log p, written straight into the gradient's rows when they are fp32
            out = grad[start:end] if fp32 else None
            logp = torch.sub(logits[start:end].float(), logz[start:end].unsqueeze(-1), out=out)
            p = logp.exp()  # the one extra buffer
            # −p·g_lp − g_h·p·(log p + H), in place
            logp.add_(entropy[start:end].unsqueeze(-1)).mul_(g_h).add_(g_lp).mul_(p).neg_()
            del p
            local_t = targets[start:end] - ctx.vocab_start
            owned = (local_t >= 0) & (local_t < local_vocab)
            # + g_lp at each owned target; a scatter of masked values instead of indexing
            # with owned.nonzero(), whose data-dependent size syncs the GPU every chunk
            logp.scatter_add_(-1, local_t.clamp(0, local_vocab - 1).unsqueeze(-1),
                              g_lp * owned.unsqueeze(-1).to(g_lp.dtype))
            if not fp32:
                grad[start:end] = logp.to(grad.dtype)
        return grad, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                    chunk_size: int = 1024, group=None,
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), both fp32 and of ``targets``' shape.

    ``logits``: ``[..., V/TP]`` sharded over the vocabulary across ``group`` (default:
    megatron's tensor-parallel group; None outside Megatron = the full vocabulary);
    ``targets``: ``[...]`` token ids in the full vocabulary.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "disagree on the token dimensions")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group = _tp_group() if group is None else group
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    lp, ent = _VocabParallelLogProbEntropy.apply(flat_logits, flat_targets, chunk_size, group)
    return lp.view(targets.shape), ent.view(targets.shape)
