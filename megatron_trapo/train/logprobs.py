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

The fused variant (``loss.fused_output_layer``, :mod:`megatron_trapo.train.output_layer`)
starts one step earlier, from the output layer's input and weight: each chunk's logits are a
GEMM inside the function, so neither the ``[tokens, V/TP]`` logits nor their gradient exist —
for a 49k vocabulary that is 0.2 GB per 1024 tokens each, in fp32.

Gradients, with p the softmax, z the logits, H the entropy:
    ∂ log p_y / ∂z_j = 1[j = y] − p_j
    ∂ H / ∂z_j       = −p_j (log p_j + H)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_trapo.config import default_logprob_chunk_rows as default_chunk_rows


def _tp_group():
    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_group()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_forward(z: torch.Tensor, targets: torch.Tensor, vocab_start: int, group
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log Z, log p(target), entropy) of one chunk of vocab-sharded logits ``z``."""
    local_vocab = z.shape[-1]
    zmax = _all_reduce(z.max(dim=-1).values.float(), dist.ReduceOp.MAX, group)
    shifted = z.to(torch.float32, copy=True).sub_(zmax.unsqueeze(-1))  # buffer 1
    local_t = targets - vocab_start
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
    return log_sum + zmax, tgt - log_sum, log_sum - sum_exp_shifted / sum_exp


def _chunk_grad(z: torch.Tensor, targets: torch.Tensor, logz: torch.Tensor,
                entropy: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor, vocab_start: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂(g_lp·log p_y + g_h·H)/∂z for one chunk, fp32 (written into ``out`` when given)."""
    local_vocab = z.shape[-1]
    g_lp, g_h = g_lp.float().unsqueeze(-1), g_h.float().unsqueeze(-1)
    logp = torch.sub(z.float(), logz.unsqueeze(-1), out=out)
    p = logp.exp()  # the one extra buffer
    # −p·g_lp − g_h·p·(log p + H), in place
    logp.add_(entropy.unsqueeze(-1)).mul_(g_h).add_(g_lp).mul_(p).neg_()
    del p
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < local_vocab)
    # + g_lp at each owned target; a scatter of masked values instead of indexing with
    # owned.nonzero(), whose data-dependent size syncs the GPU every chunk
    logp.scatter_add_(-1, local_t.clamp(0, local_vocab - 1).unsqueeze(-1),
                      g_lp * owned.unsqueeze(-1).to(g_lp.dtype))
    return logp


def _vocab_start(group, local_vocab: int) -> int:
    return (dist.get_rank(group) if group is not None else 0) * local_vocab


def _forward_chunks(chunk_logits, targets: torch.Tensor, chunk_size: int, vocab_start: int,
                    group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log Z, log p(target), entropy) per token, ``chunk_logits(start, end)`` giving one
    chunk's logits at a time."""
    tokens = targets.shape[0]
    logz, logprobs, entropy = (torch.empty(tokens, dtype=torch.float32, device=targets.device)
                               for _ in range(3))
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        logz[start:end], logprobs[start:end], entropy[start:end] = _chunk_forward(
            chunk_logits(start, end), targets[start:end], vocab_start, group)
    return logz, logprobs, entropy


def _grads_or_zeros(logz, grad_logprobs, grad_entropy):
    return (torch.zeros_like(logz) if grad_logprobs is None else grad_logprobs,
            torch.zeros_like(logz) if grad_entropy is None else grad_entropy)


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """From materialised logits ``[tokens, V/TP]``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int, group):
        vocab_start = _vocab_start(group, logits.shape[1])
        logz, logprobs, entropy = _forward_chunks(lambda a, b: logits[a:b], targets, chunk_size,
                                                  vocab_start, group)
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.chunk_size, ctx.vocab_start = chunk_size, vocab_start
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, targets, logz, entropy = ctx.saved_tensors
        g_lp, g_h = _grads_or_zeros(logz, grad_logprobs, grad_entropy)
        grad = torch.empty_like(logits)
        fp32 = logits.dtype == torch.float32
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, logits.shape[0])
            # written straight into the gradient's rows when they are fp32
            g = _chunk_grad(logits[start:end], targets[start:end], logz[start:end],
                            entropy[start:end], g_lp[start:end], g_h[start:end], ctx.vocab_start,
                            out=grad[start:end] if fp32 else None)
            if not fp32:
                grad[start:end] = g.to(grad.dtype)
        return grad, None, None, None


class _FusedOutputLogProbEntropy(torch.autograd.Function):
    """From the output layer's input ``[tokens, hidden]`` and its weight ``[V/TP, hidden]``:
    each chunk's logits are computed, used and dropped — in the backward computed again — so
    no ``[tokens, V/TP]`` tensor (logits or their gradient) ever exists. Costs one more
    output-layer GEMM per chunk in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, group):
        vocab_start = _vocab_start(group, weight.shape[0])
        logz, logprobs, entropy = _forward_chunks(lambda a, b: hidden[a:b] @ weight.t(), targets,
                                                  chunk_size, vocab_start, group)
        ctx.save_for_backward(hidden, weight, targets, logz, entropy)
        ctx.chunk_size, ctx.vocab_start = chunk_size, vocab_start
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        hidden, weight, targets, logz, entropy = ctx.saved_tensors
        g_lp, g_h = _grads_or_zeros(logz, grad_logprobs, grad_entropy)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # the weight's gradient sums over chunks: in fp32 whatever the weight's dtype
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = _chunk_grad(h @ weight.t(), targets[start:end], logz[start:end],
                            entropy[start:end], g_lp[start:end], g_h[start:end],
                            ctx.vocab_start).to(hidden.dtype)
            if want_hidden:
                torch.matmul(g, weight, out=grad_hidden[start:end])
            if want_weight:
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += (g.t() @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                    chunk_size: Optional[int] = None, group=None,
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), both fp32 and of ``targets``' shape.

    ``logits``: ``[..., V/TP]`` sharded over the vocabulary across ``group`` (default:
    megatron's tensor-parallel group; None outside Megatron = the full vocabulary);
    ``targets``: ``[...]`` token ids in the full vocabulary; ``chunk_size``: rows per chunk
    (None: :func:`default_chunk_rows`).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "disagree on the token dimensions")
    chunk_size = _chunk_rows(chunk_size, logits.shape[-1])
    group = _tp_group() if group is None else group
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    lp, ent = _VocabParallelLogProbEntropy.apply(flat_logits, flat_targets, chunk_size, group)
    return lp.view(targets.shape), ent.view(targets.shape)


def fused_output_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                  targets: torch.Tensor, chunk_size: Optional[int] = None,
                                  group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`vocab_parallel_logprobs_entropy` of ``hidden @ weight.T``, without ever
    building those logits: ``hidden`` ``[..., h]`` is the output layer's input (already
    gathered / copied into the tensor-parallel region), ``weight`` ``[V/TP, h]`` its weight."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets "
                         f"{tuple(targets.shape)} disagree on the token dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"output weight {tuple(weight.shape)} does not match hidden size "
                         f"{hidden.shape[-1]}")
    chunk_size = _chunk_rows(chunk_size, weight.shape[0])
    group = _tp_group() if group is None else group
    lp, ent = _FusedOutputLogProbEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                               targets.reshape(-1), chunk_size, group)
    return lp.view(targets.shape), ent.view(targets.shape)


def _chunk_rows(chunk_size: Optional[int], local_vocab: int) -> int:
    if chunk_size is None:
        return default_chunk_rows(local_vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size
