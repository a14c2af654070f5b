"""Core attention for megatron's local (non-Transformer-Engine) spec through torch's
``scaled_dot_product_attention``, with packed (THD) sequences.

Why not megatron's own: its local ``DotProductAttention`` materialises the ``[b, heads, s, s]``
scores, softmax and probabilities (kept for the backward: why the CPU example needed selective
recompute), refuses packed sequences, so a packed row of several sequences needs a
block-diagonal mask over the whole row (3 sequences in a 1024-token row: 3× the work of
attending within each), and runs as separate bmm / softmax / masked-fill kernels. torch's SDPA
is one fused kernel on CPU too (flash attention with a logsumexp, forward and backward) and
GQA-aware, so keys and values are not repeated. Transformer Engine is the answer on GPUs; this
is the answer where it is absent.

Contract (megatron's ``DotProductAttention.forward``): ``query [sq, b, np, hn]``, ``key`` /
``value [sk, b, ng, hn]``, returns ``[sq, b, np·hn]``; with ``packed_seq_params``
(``qkv_format="thd"``) megatron has squeezed the batch: ``[t, np, hn]`` / ``[t, ng, hn]`` in,
``[t, np·hn]`` out, each segment of ``cu_seqlens_q`` attending causally within itself only.
The mask convention is megatron's: True = masked.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class SDPADotProductAttention(DotProductAttention):
    """Drop-in ``core_attention`` for the local spec (``model.attention_backend=sdpa``).

    Reuses megatron's constructor for the per-partition head counts, softmax scale and dropout;
    refuses at build what it does not implement (sliding windows, softmax offsets)."""

    supports_packed_sequences = True

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        if config.softmax_type != "vanilla":
            raise ValueError(f"model.attention_backend=sdpa: softmax_type={config.softmax_type!r}"
                             " is not supported; use model.attention_backend=local")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     max(1, layer_number)):
            raise ValueError("model.attention_backend=sdpa: sliding-window attention is not "
                             "supported; use model.attention_backend=local")
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # megatron divides the scale by the layer number under apply_query_key_layer_scaling
        # and its softmax multiplies it back: the product is what the scores are scaled by
        self.scale = self.softmax_scale * (self.layer_number
                                           if config.apply_query_key_layer_scaling else 1)
        self.gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("model.attention_backend=sdpa: attention_bias is not supported")
        if self.training and self.attention_dropout.p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, attn_mask_type,
                                    packed_seq_params)
        return self._attend(query, key, value, attention_mask, attn_mask_type, packed_seq_params)

    def _sdpa(self, q, k, v, mask=None, causal=False):
        """``[..., heads, s, hn]`` in and out."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.gqa,
            dropout_p=self.attention_dropout.p if self.training else 0.0)

    def _attend(self, query, key, value, attention_mask, attn_mask_type, packed_seq_params):
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}:"
                                 " only thd is supported by the sdpa attention backend")
            return self._attend_packed(query, key, value, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            out = self._sdpa(q, k, v, causal=mask_type == AttnMaskType.causal)
        else:  # megatron's True = masked; SDPA's True = attend
            out = self._sdpa(q, k, v, mask=~attention_mask)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _attend_packed(self, query, key, value, params):
        """One causal SDPA per segment: no token attends across a segment boundary, and no work
        is spent on the pairs a block-diagonal mask would discard. Reads ``cu_seqlens`` on the
        host once per call (a sync on GPU; the packed GPU path is Transformer Engine's)."""
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
            else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None \
            else params.cu_seqlens_kv
        bounds_q, bounds_kv = cu_q.tolist(), cu_kv.tolist()
        if bounds_q != bounds_kv:
            raise ValueError("the sdpa attention backend needs cu_seqlens_q == cu_seqlens_kv "
                             "(self-attention over packed sequences)")
        if bounds_q[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens ends at {bounds_q[-1]} but the packed row has "
                             f"{query.shape[0]} tokens")
        outs = []
        for start, end in zip(bounds_q[:-1], bounds_q[1:]):
            if end == start:
                continue
            # [len, heads, hn] -> [heads, len, hn]
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
            outs.append(self._sdpa(q, k, v, causal=True).transpose(0, 1)
                        .reshape(end - start, self.hidden_size_per_partition))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
