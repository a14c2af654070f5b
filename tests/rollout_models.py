"""A tiny random Qwen2 with a locally trained tokenizer, for the rollout contract tests."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [f"Question {i}: what is {i} plus {i * 3}? The answer is {i * 4}." for i in range(200)]


def tiny_qwen2(out: Path, seed: int = 0, vocab: int = 320, max_positions: int = 256) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_trapo.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab - 8, out)
    torch.manual_seed(seed)
    # head_dim 32: vLLM's CPU attention has no kernel for smaller heads
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=None,
                      pad_token_id=tok.pad_token_id, dtype=torch.float32)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # peaked but varied next-token distributions (no near-ties)
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out)
    return out
