"""The HF mapping's transforms against hand-built layouts, and its refusals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_trapo.config import ConfigError, ModelConfig
from megatron_trapo.models.hf.mapping import (fuse_qkv, hf_to_model_config, model_to_hf_config,
                                              split_qkv, to_hf, to_mcore)

TOOLS = Path(__file__).resolve().parents[3] / "tools"


def test_qkv_interleaves_per_query_group():
    # 4 heads, 2 groups, head dim 1: rows name themselves.
    m = ModelConfig(hidden_size=4, num_attention_heads=4, num_query_groups=2, kv_channels=1)
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0,1 -> group 0; 2,3 -> group 1
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, m)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, m), (q, k, v)))
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], m)  # 1-D biases follow the same layout
    assert bias.tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_gate_up_and_vocab_padding():
    m = ModelConfig(vocab_size=5)
    gate, up = torch.ones(3, 2), torch.zeros(3, 2)
    fc1 = to_mcore("gate_up", [gate, up], m, 8)
    assert torch.equal(fc1[:3], gate) and torch.equal(fc1[3:], up)
    emb = torch.randn(5, 2)
    padded = to_mcore("vocab", [emb], m, 8)
    assert padded.shape == (8, 2) and torch.equal(padded[5:], torch.zeros(3, 2))
    assert torch.equal(to_hf("vocab", padded, m)[0], emb)


def _hf(arch, **kw):
    cfg = dict(architectures=[arch], num_hidden_layers=2, hidden_size=64, intermediate_size=96,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
               max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
               tie_word_embeddings=True, torch_dtype="bfloat16")
    cfg.update(kw)
    return cfg


def test_config_translation_per_family():
    qwen2, fam = hf_to_model_config(_hf("Qwen2ForCausalLM"))
    assert fam.name == "qwen2" and qwen2.add_qkv_bias and not qwen2.qk_layernorm
    assert qwen2.params_dtype == "bf16" and not qwen2.untie_embeddings_and_output_weights
    qwen3, _ = hf_to_model_config(_hf("Qwen3ForCausalLM", head_dim=32))
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and qwen3.kv_channels == 32
    llama, _ = hf_to_model_config(_hf("LlamaForCausalLM", rope_theta=None,
                                      rope_parameters={"rope_theta": 5e5, "rope_type": "default"},
                                      tie_word_embeddings=False))
    assert llama.rotary_base == 5e5 and llama.untie_embeddings_and_output_weights
    back = model_to_hf_config(qwen2, {"bos_token_id": 7})
    assert back["bos_token_id"] == 7 and back["num_key_value_heads"] == 2
    assert back["torch_dtype"] == "bfloat16" and back["tie_word_embeddings"] is True


@pytest.mark.parametrize("cfg, message", [
    (_hf("GPT2LMHeadModel"), "unsupported architecture 'GPT2LMHeadModel'; supported: "
                             r"\['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\]"),
    (_hf("LlamaForCausalLM", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope scaling type 'llama3' is not supported"),
    (_hf("LlamaForCausalLM", mlp_bias=True), "mlp_bias=true"),
    (_hf("Qwen2ForCausalLM", use_sliding_window=True), "use_sliding_window"),
])
def test_refusals(cfg, message):
    with pytest.raises(ConfigError, match=message):
        hf_to_model_config(cfg)


def _tool(*args):
    return subprocess.run([sys.executable, str(TOOLS / args[0]), *args[1:]],
                          capture_output=True, text=True, timeout=300)


def test_cli_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf("MistralForCausalLM")))
    proc = _tool("convert_hf_to_mcore.py", "--hf-dir", str(tmp_path), "--out-dir",
                 str(tmp_path / "out"))
    assert proc.returncode == 2 and "unsupported architecture 'MistralForCausalLM'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_tp_checked_before_any_tensor_is_read(tmp_path):
    # No weights at all: the layout error must come first.
    (tmp_path / "config.json").write_text(json.dumps(_hf("LlamaForCausalLM")))
    proc = _tool("convert_hf_to_mcore.py", "--hf-dir", str(tmp_path), "--out-dir",
                 str(tmp_path / "out"), "--tp", "4")
    assert proc.returncode == 2
    assert "num_query_groups=2 is not divisible by tensor_model_parallel_size=4" in proc.stderr
    proc = _tool("convert_hf_to_mcore.py", "--hf-dir", str(tmp_path), "--out-dir",
                 str(tmp_path / "out"), "--tp", "2")
    assert proc.returncode == 2 and "no model.safetensors" in proc.stderr
    assert not (tmp_path / "out").exists()
