"""FP8 weights for the engines (issue 19, first part): modelopt's quantization against the
scale rule worked by hand, the round trip within FP8's error bound per tensor, the engines'
tensor names, and the exported checkpoint read back by transformers' own FP8 loader."""
import json

import pytest
import torch

from megatron_trapo.rollout import fp8  # quantizes with nvidia-modelopt (scripts/setup.sh)


@pytest.mark.parametrize("block", [(128, 128), None])
@pytest.mark.parametrize("shape", [(320, 200), (128, 256), (64, 48)])
def test_quantize_is_the_scale_rule_by_hand_and_round_trips_within_fp8s_bound(block, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w[3, 5] = 0.9  # an outlier sets its block's scale
    q, scale = fp8.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32
    if block is None:
        assert scale.shape == (1,)
        hand = w.abs().max() / 448
    else:
        bn, bk = block
        assert scale.shape == (-(-shape[0] // bn), -(-shape[1] // bk))
        hand = torch.tensor([[w[i:i + bn, j:j + bk].abs().max() / 448
                              for j in range(0, shape[1], bk)] for i in range(0, shape[0], bn)])
    assert torch.allclose(scale, hand.reshape(scale.shape), rtol=1e-6)
    per = fp8._per_element(scale, shape, block)
    assert torch.equal(q, (w / per).to(torch.float8_e4m3fn))  # the cast, element by element
    back = fp8.dequantize(q, scale, block)
    assert ((back - w).abs() <= fp8.error_bound(w, scale, block)).all()
    assert (back - w).abs().max() > 0  # it did quantize


def test_only_decoder_linears_get_fp8_and_a_scale_named_as_the_engines_load_it():
    named = [("model.embed_tokens.weight", torch.randn(10, 8)),
             ("model.layers.0.input_layernorm.weight", torch.ones(8)),
             ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
             ("model.layers.0.self_attn.q_proj.bias", torch.randn(8)),
             ("model.layers.1.mlp.down_proj.weight", torch.randn(8, 16)),
             ("lm_head.weight", torch.randn(10, 8))]
    block = list(fp8.quantize_named(iter(named), (128, 128)))
    assert [n for n, _ in block] == [
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight_scale_inv", "lm_head.weight"]
    assert [t.dtype for n, t in block if n.endswith("proj.weight")] == [torch.float8_e4m3fn] * 2
    per_tensor = dict(fp8.quantize_named(iter(named), None))
    assert per_tensor["model.layers.0.self_attn.q_proj.weight_scale"].shape == (1,)
    back = fp8.dequantize_named(dict(block), (128, 128))
    assert set(back) == {n for n, _ in named}  # scales consumed
    for n, t in named:
        assert torch.equal(back[n], t) if not fp8.is_quantized(n) else \
            ((back[n] - t).abs() <= fp8.error_bound(t, dict(block)[n + "_scale_inv"],
                                                    (128, 128))).all()
    with pytest.raises(ValueError, match="q_proj.weight: an fp8 tensor without"):
        fp8.dequantize_named({"model.layers.0.self_attn.q_proj.weight":
                              dict(block)["model.layers.0.self_attn.q_proj.weight"]}, (128, 128))


def test_the_exported_checkpoint_loads_in_transformers_fp8_loader(tmp_path):
    """The native format (quant_method fp8, 128×128 blocks, weight_scale_inv) as written for
    the servers' Fp8Config, read back by transformers' own finegrained-FP8 quantizer (which
    dequantizes on a CPU): the same logits as our dequantized weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    tensors = dict(fp8.quantize_named(iter(model.state_dict().items()), (128, 128)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    hf = cfg.to_dict()
    hf["quantization_config"] = fp8.quantization_config((128, 128))
    hf["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ours = Qwen2ForCausalLM(cfg).eval()
    ours.load_state_dict(fp8.dequantize_named(tensors, (128, 128)))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - c).abs().max() > 1e-4  # the quantized model differs from the original
