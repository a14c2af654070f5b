"""The named architectures as plain field dicts (data only, no imports: ``config`` reads it to
apply ``model_preset``). Values follow each model's published HF ``config.json``; when a model
is converted from HF, the converter reads the real config and these are not used."""
from __future__ import annotations

_QWEN25 = dict(normalization="RMSNorm", add_qkv_bias=True, swiglu=True, norm_epsilon=1e-6,
               rotary_base=1_000_000.0, hf_architecture="Qwen2ForCausalLM")
_QWEN3 = dict(normalization="RMSNorm", add_qkv_bias=False, qk_layernorm=True, swiglu=True,
              norm_epsilon=1e-6, rotary_base=1_000_000.0, kv_channels=128,
              max_position_embeddings=40960, vocab_size=151936, hf_architecture="Qwen3ForCausalLM")
_LLAMA3 = dict(normalization="RMSNorm", add_qkv_bias=False, swiglu=True, norm_epsilon=1e-5,
               rotary_base=500_000.0, vocab_size=128256, max_position_embeddings=8192,
               untie_embeddings_and_output_weights=True, hf_architecture="LlamaForCausalLM")

PRESETS: dict[str, dict] = {
    # A model small enough for unit tests on 2 CPU cores; divisible by TP up to 4.
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=256, max_position_embeddings=256,
                 rotary_base=10000.0, norm_epsilon=1e-6, hf_architecture="LlamaForCausalLM"),
    "qwen2.5-0.5b": dict(_QWEN25, num_layers=24, hidden_size=896, ffn_hidden_size=4864,
                         num_attention_heads=14, num_query_groups=2, vocab_size=151936,
                         max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(_QWEN25, num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
                         num_attention_heads=12, num_query_groups=2, vocab_size=151936,
                         max_position_embeddings=32768),
    "qwen2.5-7b": dict(_QWEN25, num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
                       num_attention_heads=28, num_query_groups=4, vocab_size=152064,
                       max_position_embeddings=32768, untie_embeddings_and_output_weights=True),
    "qwen2.5-math-7b": dict(_QWEN25, num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
                            num_attention_heads=28, num_query_groups=4, vocab_size=152064,
                            max_position_embeddings=4096, rotary_base=10000.0,
                            untie_embeddings_and_output_weights=True),
    "qwen2.5-32b": dict(_QWEN25, num_layers=64, hidden_size=5120, ffn_hidden_size=27648,
                        num_attention_heads=40, num_query_groups=8, vocab_size=152064,
                        max_position_embeddings=32768, norm_epsilon=1e-5,
                        untie_embeddings_and_output_weights=True),
    "qwen3-0.6b": dict(_QWEN3, num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                       num_attention_heads=16, num_query_groups=8),
    "qwen3-1.7b": dict(_QWEN3, num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                       num_attention_heads=16, num_query_groups=8),
    "qwen3-4b": dict(_QWEN3, num_layers=36, hidden_size=2560, ffn_hidden_size=9728,
                     num_attention_heads=32, num_query_groups=8),
    "qwen3-8b": dict(_QWEN3, num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                     num_attention_heads=32, num_query_groups=8,
                     untie_embeddings_and_output_weights=True),
    "qwen3-14b": dict(_QWEN3, num_layers=40, hidden_size=5120, ffn_hidden_size=17408,
                      num_attention_heads=40, num_query_groups=8,
                      untie_embeddings_and_output_weights=True),
    "qwen3-32b": dict(_QWEN3, num_layers=64, hidden_size=5120, ffn_hidden_size=25600,
                      num_attention_heads=64, num_query_groups=8,
                      untie_embeddings_and_output_weights=True),
    "llama3-8b": dict(_LLAMA3, num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, num_query_groups=8),
    "llama3-70b": dict(_LLAMA3, num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                       num_attention_heads=64, num_query_groups=8),
    "smollm2-135m": dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                         num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                         max_position_embeddings=8192, rotary_base=100000.0, norm_epsilon=1e-5,
                         normalization="RMSNorm", swiglu=True, hf_architecture="LlamaForCausalLM"),
}
