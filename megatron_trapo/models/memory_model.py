"""Memory of a model's training state and activations, from its architecture alone (no torch):
the formulas behind the GPU layout planner (launch/memory.py, whose docstring explains each
term) and the CPU trainer's start-up check (train/cpu_memory.py)."""
from __future__ import annotations

from typing import Dict

from megatron_trapo.config import LossConfig, ModelConfig, default_logprob_chunk_rows


def layer_params(m: ModelConfig, tp: int) -> Dict[str, float]:
    """Parameters of one transformer layer on one TP rank: sharded matrices, replicated norms."""
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    h_q, kv = m.num_attention_heads * head_dim, m.query_groups * head_dim
    qkv = m.hidden_size * (h_q + 2 * kv) + ((h_q + 2 * kv) if m.add_qkv_bias else 0)
    proj = h_q * m.hidden_size
    mlp = (3 if m.swiglu else 2) * m.hidden_size * m.ffn_hidden_size
    norms = 2 * m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    norms += 2 * head_dim if m.qk_layernorm else 0
    return {"sharded": (qkv + proj + mlp) / tp, "replicated": float(norms)}


def activation_bytes_per_token(m: ModelConfig, tp: int, sp: bool) -> float:
    """Bytes backward keeps per token for one layer without recompute (launch/memory.py explains each term)."""
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    h_q, kv = m.num_attention_heads * head_dim, m.query_groups * head_dim
    seq_part = 8 * m.hidden_size  # 2 norm inputs + 2 linear inputs, bf16
    tp_part = 4 * h_q + 4 * kv + (6 if m.swiglu else 4) * m.ffn_hidden_size \
        + 4 * m.num_attention_heads
    return seq_part / (tp if sp else 1) + tp_part / tp


def stored_activation_bytes(m: ModelConfig, layers: int, tokens: int, tp: int, sp: bool) -> float:
    """Activations of ``layers`` layers for one micro-batch of ``tokens``, under the model's
    recompute setting; plus the layers recomputed at once in backward."""
    full = activation_bytes_per_token(m, tp, sp) * tokens
    if m.recompute_granularity != "full":
        return full * layers
    k = m.recompute_num_layers or 1
    layer_input = 2 * m.hidden_size / (tp if sp else 1) * tokens
    if m.recompute_method == "block":  # the first k layers recomputed, the rest stored
        kept = max(layers - k, 0)
        return full * kept + layer_input * min(k, layers) + (full if k else 0)
    chunks = -(-layers // k)  # uniform: every chunk of k layers keeps its input only
    return layer_input * chunks + full * min(k, layers)


def logits_bytes(loss: LossConfig, tokens: int, local_vocab: float) -> float:
    """The loss's logit memory for one micro-batch of ``tokens`` (launch/memory.py explains it)."""
    rows = loss.logprob_chunk_size or default_logprob_chunk_rows(int(local_vocab))
    chunks = 12 * min(rows, tokens) * local_vocab
    return chunks if loss.fused_output_layer else 2 * 2 * tokens * local_vocab + chunks
