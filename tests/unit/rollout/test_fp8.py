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


def test_a_weight_and_its_scale_share_a_bucket():
    """An engine that dequantizes needs an fp8 weight with its scale: a bucket never ends
    between them, however small the bucket."""
    from megatron_trapo.rollout.weight_sync import buckets

    named = [(f"model.layers.{i}.mlp.up_proj.weight", torch.randn(64, 32)) for i in range(3)]
    out = list(buckets(fp8.quantize_named(iter(named), (16, 16)), bucket_bytes=1000))
    assert len(out) == 3  # 2048 bytes of fp8 each: one weight per bucket, its scale with it
    for bucket in out:
        names = [n for n, _ in bucket]
        assert names == [names[0], names[0] + "_scale_inv"]


def _tiny_folder(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("block", [[32, 32], None])
def test_the_hf_engine_serves_an_fp8_export_and_takes_fp8_updates(tmp_path, block):
    """tools/quantize_fp8.py's export, loaded by the HF engine (the protocol server's): the
    weights are the fp8 values dequantized; a later update of fp8 tensors + scales (as the
    broadcast sends them) or of an FP8 folder (disk) lands dequantized; a folder of another
    layout is refused, as SGLang keeps the layout it started with."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.types import RolloutError

    model = _tiny_folder(tmp_path / "hf")
    shown = ["none"] if block is None else [str(b) for b in block]
    tool = Path(__file__).resolve().parents[3] / "tools" / "quantize_fp8.py"
    proc = subprocess.run([sys.executable, str(tool), str(tmp_path / "hf"), str(tmp_path / "q"),
                           "--block-size", *shown], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "14 fp8 weights" in proc.stdout
    engine = HFEngine(str(tmp_path / "q"))
    state = model.state_dict()
    quantized = dict(fp8.quantize_named(iter(state.items()), block))
    expected = fp8.dequantize_named(quantized, block)
    served = engine.model.state_dict()
    for name, t in expected.items():
        assert torch.equal(served[name], t), name
    assert (served["model.layers.0.mlp.up_proj.weight"]
            - state["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0  # really quantized
    # a broadcast-style update: fp8 tensors and scales of new weights
    new = {n: t + 0.01 * torch.randn_like(t) for n, t in state.items()}
    engine.update_weights_from_tensors(dict(fp8.quantize_named(iter(new.items()), block)), "2")
    want = fp8.dequantize_named(dict(fp8.quantize_named(iter(new.items()), block)), block)
    assert all(torch.equal(engine.model.state_dict()[n], t) for n, t in want.items())
    # a folder of another layout (unquantized) is refused by name
    with pytest.raises(RolloutError, match="FP8 False with block None, but this engine serves"):
        engine.update_weights_from_disk(str(tmp_path / "hf"), "3")
    # and an unquantized engine refuses fp8 tensors
    plain = HFEngine(str(tmp_path / "hf"))
    with pytest.raises(RolloutError, match="not started from an FP8 export"):
        plain.update_weights_from_tensors(dict(fp8.quantize_named(iter(new.items()), block)), "2")


def test_servers_must_start_from_an_fp8_export_of_the_sync_s_block(tmp_path):
    """rollout.quantization=fp8 with servers launched from rollout.model_path: a plain folder
    or an export of another block size is refused before any server starts, with the command
    that makes the right one."""
    from megatron_trapo.config import RolloutConfig
    from megatron_trapo.rollout import make_engine
    from megatron_trapo.rollout.types import RolloutError

    _tiny_folder(tmp_path / "hf")
    fp8.export_folder(str(tmp_path / "hf"), str(tmp_path / "q"), [32, 32])
    cfg = RolloutConfig(engine="sglang", model_path=str(tmp_path / "hf"), quantization="fp8",
                        weight_sync="disk")
    with pytest.raises(RolloutError, match=r"not an FP8 export.*tools/quantize_fp8.py"):
        make_engine(cfg, weight_updates=True)
    cfg.model_path = str(tmp_path / "q")
    with pytest.raises(RolloutError, match=r"an FP8 export with block \[32, 32\], but "
                                           r"rollout.fp8_block_size is \[128, 128\]"):
        make_engine(cfg, weight_updates=True)
    fp8.check_serving_folder(str(tmp_path / "q"), [32, 32])  # the matching one passes
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["quantization_config"] == fp8.quantization_config([32, 32])
    with pytest.raises(ValueError, match="already quantized"):
        fp8.export_folder(str(tmp_path / "q"), str(tmp_path / "qq"), [32, 32])


def test_quantization_turns_tis_on_unless_told_not_to():
    from megatron_trapo.config import DEFAULT_TIS_CAP, ConfigError, TrainConfig, load_config
    from megatron_trapo.train.step import old_logprobs_source

    assert load_config(TrainConfig, None, []).loss.tis_cap is None
    on = load_config(TrainConfig, None, ["rollout.quantization=fp8"])
    assert on.loss.tis_cap == DEFAULT_TIS_CAP == 2.0
    assert old_logprobs_source(on) == "recompute"  # TIS needs pi_old from the trainer
    off = load_config(TrainConfig, None, ["rollout.quantization=fp8", "loss.tis_cap=0"])
    assert off.loss.tis_cap == 0 and old_logprobs_source(off) == "current"
    assert load_config(TrainConfig, None, ["rollout.quantization=fp8",
                                           "loss.tis_cap=5"]).loss.tis_cap == 5
    with pytest.raises(ConfigError, match="loss.tis_cap must be >= 0"):
        load_config(TrainConfig, None, ["loss.tis_cap=-1"])
    # every sync mode now carries FP8 (the servers' need an FP8 export: make_engine checks)
    for mode in ("disk", "distributed"):
        cfg = load_config(TrainConfig, None, ["rollout.quantization=fp8", "rollout.engine=sglang",
                                              f"rollout.weight_sync={mode}"])
        assert cfg.rollout.resolved_weight_sync == mode


@pytest.mark.skipif(not __import__("os").environ.get("TRAPO_VLLM_PYTHON"),
                    reason="needs TRAPO_VLLM_PYTHON: a python with vLLM's wheel "
                           "(benchmarks/check_fp8_parsers.py says how to make one)")
@pytest.mark.parametrize("block", [[128, 128], None])
def test_vllm_s_own_fp8config_parses_the_export(tmp_path, block):
    """Opt-in (vLLM's wheel and its ~20 dependencies are not part of CI's set-up): vLLM's
    ``Fp8Config.from_config`` reads our export as a serialized FP8 checkpoint with dynamic
    activations, our block size and our ignored layers."""
    import os
    import subprocess
    from pathlib import Path

    _tiny_folder(tmp_path / "hf")
    fp8.export_folder(str(tmp_path / "hf"), str(tmp_path / "q"), block)
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "check_fp8_parsers.py"
    proc = subprocess.run([os.environ["TRAPO_VLLM_PYTHON"], str(script), str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '"is_checkpoint_fp8_serialized": true' in proc.stdout
