"""Named architectures (the table is ``preset_table.py``) and their parameter counts."""
from __future__ import annotations

from megatron_trapo.config import ModelConfig, model_preset as preset
from megatron_trapo.models.preset_table import PRESETS

__all__ = ["PRESETS", "num_parameters", "preset"]


def num_parameters(model: ModelConfig) -> int:
    """Parameter count of the architecture (unpadded vocab), for sizing and preset checks."""
    h, v = model.hidden_size, model.vocab_size
    kv = model.kv_channels or h // model.num_attention_heads
    q_dim, kv_dim = model.num_attention_heads * kv, model.query_groups * kv
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    if model.add_qkv_bias:
        attn += q_dim + 2 * kv_dim
    if model.qk_layernorm:
        attn += 2 * kv
    mlp = (3 if model.swiglu else 2) * h * model.ffn_hidden_size
    norms = 2 * h if model.normalization == "RMSNorm" else 4 * h
    per_layer = attn + mlp + norms
    embeddings = v * h * (2 if model.untie_embeddings_and_output_weights else 1)
    final_norm = h if model.normalization == "RMSNorm" else 2 * h
    return embeddings + model.num_layers * per_layer + final_norm
