"""The HF ↔ Megatron name and layout mapping, declared once per model family.

Why our own and not Megatron-Bridge: PyPI ``megatron-bridge`` (0.3.1) cannot be installed
without CUDA (hard dependencies on transformer-engine cu13, mamba-ssm, causal-conv1d, …) and its
TP scatter scrambles row-parallel weights on gloo. For other architectures on GPU clusters,
Megatron-Bridge is the route.

Megatron names here are the *storage keys* of megatron's ``sharded_state_dict`` (Transformer
Engine naming — the local spec maps its norms onto them), with ``{i}`` for the global layer
index. Every tensor is the **global** (unsharded, TP=1) tensor; TP/PP slicing is left to
megatron's own sharded-state-dict machinery (see ``conversion.py``), so the table says only
what differs between the two formats:

- ``qkv``: HF's separate q/k/v projections ↔ megatron's fused ``linear_qkv``, interleaved per
  query group ``[q heads of group g | k_g | v_g]`` (weights and biases alike);
- ``gate_up``: HF's ``gate_proj``/``up_proj`` ↔ ``linear_fc1`` = ``[gate; up]``;
- ``vocab``: embeddings / LM head, padded with zero rows to the padded vocab size and unpadded
  on the way back;
- ``copy``: the same tensor under another name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_trapo.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is made of."""

    mcore: str
    hf: Tuple[str, ...]
    kind: str  # copy | qkv | gate_up | vocab


@dataclass(frozen=True)
class Family:
    """A model family: which HF architectures it covers and how their configs read."""

    name: str
    architectures: Tuple[str, ...]
    qkv_bias: Optional[bool]  # None: from config "attention_bias"
    qk_norm: bool


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

_DENSE_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    Rule(_M + "self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), "copy"),
    Rule(_M + "self_attention.linear_qkv.weight",
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
          _L + "self_attn.v_proj.weight"), "qkv"),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "copy"),
    Rule(_M + "mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), "copy"),
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         "gate_up"),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy"),
)
_UNTIED_RULES = (Rule("output_layer.weight", ("lm_head.weight",), "vocab"),)
_QKV_BIAS_RULES = (
    Rule(_M + "self_attention.linear_qkv.bias",
         (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
         "qkv"),
)
_QK_NORM_RULES = (
    Rule(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "copy"),
    Rule(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "copy"),
)

FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), qkv_bias=None, qk_norm=False),  # Llama 3, SmolLM2
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias=True, qk_norm=False),  # Qwen2, Qwen2.5(-Math)
    Family("qwen3", ("Qwen3ForCausalLM",), qkv_bias=None, qk_norm=True),   # Qwen3 dense
)
SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.architectures)


def family_for_architecture(arch: str) -> Family:
    for fam in FAMILIES:
        if arch in fam.architectures:
            return fam
    raise ConfigError(f"unsupported architecture {arch!r}; supported: "
                      f"{list(SUPPORTED_ARCHITECTURES)} (Megatron-Bridge covers others on GPU "
                      "clusters)")


def rules_for(model: ModelConfig) -> List[Rule]:
    """The mapping rules of this model (its family plus its options)."""
    rules = list(_DENSE_RULES)
    if model.untie_embeddings_and_output_weights:
        rules += _UNTIED_RULES
    if model.add_qkv_bias:
        rules += _QKV_BIAS_RULES
    if model.qk_layernorm:
        rules += _QK_NORM_RULES
    return rules


def expand(rule: Rule, layer: Optional[int]) -> Tuple[str, Tuple[str, ...]]:
    """(megatron key, HF names) of a rule for one layer (or a non-layer rule)."""
    if "{i}" not in rule.mcore:
        return rule.mcore, rule.hf
    return rule.mcore.format(i=layer), tuple(h.format(i=layer) for h in rule.hf)


def all_tensor_names(model: ModelConfig) -> List[Tuple[str, Tuple[str, ...], str]]:
    """Every (megatron key, HF names, kind) of the model, layer by layer."""
    out = []
    for rule in rules_for(model):
        layers = range(model.num_layers) if "{i}" in rule.mcore else [None]
        for i in layers:
            key, hf = expand(rule, i)
            out.append((key, hf, rule.kind))
    return out


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def template_of(key: str) -> Tuple[str, Optional[int]]:
    """``decoder.layers.7.mlp…`` → (``decoder.layers.{i}.mlp…``, 7)."""
    m = _LAYER_KEY.match(key)
    if m:
        return f"decoder.layers.{{i}}.{m.group(2)}", int(m.group(1))
    return key, None


def rule_for_key(model: ModelConfig, key: str) -> Tuple[Rule, Optional[int]]:
    template, layer = template_of(key)
    for rule in rules_for(model):
        if rule.mcore == template:
            return rule, layer
    raise KeyError(f"no HF mapping for megatron tensor {key!r}")


# --- transforms between global tensors -------------------------------------------------------

def _kv(model: ModelConfig) -> Tuple[int, int, int]:
    kv = model.kv_channels or model.hidden_size // model.num_attention_heads
    groups = model.query_groups
    return kv, groups, model.num_attention_heads // groups


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """HF q, k, v (weights [out, h] or biases [out]) → megatron's per-group interleaved QKV."""
    kv, groups, per_group = _kv(model)
    tail = q.shape[1:]
    parts = [q.reshape(groups, per_group * kv, *tail), k.reshape(groups, kv, *tail),
             v.reshape(groups, kv, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`."""
    kv, groups, per_group = _kv(model)
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * kv, *tail)
    q, k, v = torch.split(grouped, [per_group * kv, kv, kv], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def to_mcore(kind: str, hf: Sequence[torch.Tensor], model: ModelConfig, padded_vocab: int
             ) -> torch.Tensor:
    """The global megatron tensor made from HF tensors."""
    if kind == "copy":
        return hf[0]
    if kind == "qkv":
        return fuse_qkv(*hf, model)
    if kind == "gate_up":
        return torch.cat([hf[0], hf[1]], dim=0)
    if kind == "vocab":
        w = hf[0]
        if w.shape[0] > padded_vocab:
            raise ConfigError(f"HF vocab rows {w.shape[0]} exceed padded vocab {padded_vocab}")
        pad = w.new_zeros((padded_vocab - w.shape[0], *w.shape[1:]))
        return torch.cat([w, pad], dim=0)
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_hf(kind: str, t: torch.Tensor, model: ModelConfig) -> Tuple[torch.Tensor, ...]:
    """The HF tensors made from a global megatron tensor."""
    if kind == "copy":
        return (t,)
    if kind == "qkv":
        return split_qkv(t, model)
    if kind == "gate_up":
        gate, up = torch.chunk(t, 2, dim=0)
        return gate.contiguous(), up.contiguous()
    if kind == "vocab":
        return (t[: model.vocab_size].contiguous(),)
    raise ValueError(f"unknown mapping kind {kind!r}")


# --- configs ---------------------------------------------------------------------------------

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


def _rope_theta(hf: Dict) -> float:
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta")
    if theta is None:
        raise ConfigError("HF config has neither rope_theta nor rope_parameters.rope_theta")
    scaling = hf.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else \
        params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise ConfigError(f"HF config rope scaling type {rope_type!r} is not supported "
                          "(only unscaled RoPE)")
    return float(theta)


def hf_to_model_config(hf: Dict, params_dtype: Optional[str] = None) -> Tuple[ModelConfig, Family]:
    """ModelConfig (and family) of an HF ``config.json`` dict; refuses what we cannot map."""
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise ConfigError(f"HF config must name exactly one architecture, got {archs}; "
                          f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    fam = family_for_architecture(archs[0])
    if hf.get("mlp_bias"):
        raise ConfigError(f"{archs[0]} with mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{archs[0]} with use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf.get('hidden_act')!r} is not supported (silu only)")
    heads = hf["num_attention_heads"]
    dtype = params_dtype or _DTYPE_NAMES.get(str(hf.get("torch_dtype") or hf.get("dtype")), "fp32")
    model = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=_rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        normalization="RMSNorm",
        add_qkv_bias=fam.qkv_bias if fam.qkv_bias is not None else bool(hf.get("attention_bias", False)),
        qk_layernorm=fam.qk_norm,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        swiglu=True,
        params_dtype=dtype,
        hf_architecture=archs[0],
    )
    return model, fam


def model_to_hf_config(model: ModelConfig, base: Optional[Dict] = None) -> Dict:
    """An HF ``config.json`` dict for ``model`` (keeping unrelated fields of ``base``)."""
    if model.hf_architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model.hf_architecture={model.hf_architecture!r} is not one of "
                          f"{list(SUPPORTED_ARCHITECTURES)}")
    fam = family_for_architecture(model.hf_architecture)
    hf = dict(base or {})
    hf.update(
        architectures=[model.hf_architecture],
        model_type=fam.name if fam.name != "llama" else "llama",
        num_hidden_layers=model.num_layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
        vocab_size=model.vocab_size,
        max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rotary_base,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        hidden_act="silu",
        torch_dtype=_HF_DTYPE[model.dtype],
    )
    # transformers >= 5 reads rope_parameters, older readers (and SGLang/vLLM) rope_theta.
    hf["rope_parameters"] = {"rope_theta": model.rotary_base, "rope_type": "default"}
    hf.pop("rope_scaling", None)
    hf.pop("quantization_config", None)
    if fam.qkv_bias is None:
        hf["attention_bias"] = model.add_qkv_bias
    return hf
