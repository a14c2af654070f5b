"""A torch norm that megatron's local (non-Transformer-Engine) spec can use with sequence parallel.

Why: megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``. With sequence
parallelism each TP rank normalises a different slice of the sequence, so the norm weight's
gradient is partial on every rank; megatron's ``finalize_model_grads`` all-reduces exactly the
parameters tagged ``sequence_parallel=True`` over the TP group. Building the plain torch norm
and tagging its parameters is all that is missing.
"""
from __future__ import annotations

import torch


def _device(config):
    """Where megatron puts its own parameters: the current GPU unless ``use_cpu_initialization``."""
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.cuda.current_device()
    return None


class SequenceParallelTorchNorm:
    """Factory with megatron's norm signature; returns ``torch.nn.RMSNorm`` or ``LayerNorm``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype,
                                    device=_device(config))
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype,
                                      device=_device(config))
        else:
            raise ValueError(f"normalization={config.normalization!r}: only RMSNorm and "
                             "LayerNorm are supported by the local spec")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class QKTorchNorm:
    """Per-head q/k norm (Qwen3). Not sequence-parallel: it acts on TP-split heads, and
    megatron all-reduces ``q_layernorm``/``k_layernorm`` grads over TP by name."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        kind = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        return kind(hidden_size, eps=eps, dtype=config.params_dtype, device=_device(config))
