"""The output layer folded into the loss (``loss.fused_output_layer``): the model returns the
output layer's input and the loss computes logits chunk by chunk from it and the layer's weight
(:func:`megatron_trapo.train.logprobs.fused_output_logprobs_entropy`).

Megatron's ``GPTModel`` offers no way to stop before its output layer and keep the final
norm, so within :func:`hidden_states_out` the last stage's ``ColumnParallelLinear`` returns its
input after the same tensor-parallel mapping it applies before its GEMM: with sequence
parallel an all-gather of the sequence (reduce-scatter of the gradient), else an identity whose
gradient is all-reduced over TP. Its weight — the shared embedding when tied — is what the
loss multiplies by, so the tied weight's gradient sums both uses exactly as megatron's does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from megatron.core.utils import get_attr_wrapped_model


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous. GPTModel transposes the output layer's
    result ([s, b] → [b, s]), so the gradient reaching the TP mapping is a transposed view, and
    megatron's ``_reduce`` all-reduces ``grad.contiguous()`` — a copy, whose sum is then lost
    (its own output layer never sees this: its GEMM makes a fresh gradient first). Without
    this, TP>1 trains on one rank's share of the hidden-state gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _gpt_model(model: torch.nn.Module):
    """The ``GPTModel`` inside megatron's wrappers (DDP, Float16Module)."""
    return get_attr_wrapped_model(model, "post_process", return_model_obj=True)


def output_weight(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The output layer's weight ``[V/TP, h]`` (the shared embedding when tied); None on a
    pipeline stage without the output layer."""
    gpt = _gpt_model(model)
    if not gpt.post_process:
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: the model's forward returns ``[b, s, h]`` output-layer inputs instead of
    ``[b, s, V/TP]`` logits (last pipeline stage; other stages are unchanged)."""
    gpt = _gpt_model(model)
    if not enabled or not gpt.post_process:
        yield
        return
    layer = gpt.output_layer

    def forward(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            out = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                       group=layer.tp_group)
        else:
            out = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
        return _ContiguousGrad.apply(out), None

    layer.forward = forward  # an instance attribute: shadows the class's forward
    try:
        yield
    finally:
        del layer.forward
