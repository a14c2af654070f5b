"""Global parameter names of a pipeline-stage model chunk.

On pipeline stage k a chunk numbers its layers from 0 (``decoder.layers.0`` …) although they
are layers ``offset..offset+n`` of the whole model. Tests, weight sync and conversion compare
parameters across layouts by their global names.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

import torch
from megatron.core.utils import unwrap_model

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` of a GPTModel chunk with layer indices made global (0-based)."""
    model = unwrap_model(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = layers[int(match.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
        yield name, param


def global_named_main_grads(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Gradients accumulated by megatron's DDP (``main_grad``), keyed by global name."""
    out = {}
    for name, param in global_named_parameters(chunk):
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            out[name] = grad.detach().clone()
    return out
