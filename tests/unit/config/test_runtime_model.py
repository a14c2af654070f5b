"""With ``load=``, the architecture comes from the checkpoint and the run-time fields (FP8,
recompute, transformer impl, dtype) from the run's config — and reach the TransformerConfig."""
import json

import pytest
import torch

from megatron_trapo.config import (ConfigError, ModelConfig, ParallelConfig, TrainConfig,
                                   load_config, runtime_model)


def fake_checkpoint(root, model: ModelConfig):
    """A checkpoint folder as far as its recorded model config goes."""
    import dataclasses

    it = root / "iter_0000000"
    it.mkdir(parents=True)
    (it / "trapo_meta.json").write_text(json.dumps({"config": {"model": dataclasses.asdict(model)}}))
    (root / "latest_checkpointed_iteration.txt").write_text("0")
    return root


CKPT_MODEL = ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=256,
                         num_attention_heads=4, num_query_groups=2, vocab_size=500,
                         params_dtype="bf16", hf_architecture="Qwen2ForCausalLM")


def built_config(tmp_path, monkeypatch, *overrides, te=False):
    """The TransformerConfig a run with these overrides builds. ``te``: pretend Transformer
    Engine is present and record the config's fields instead of building it (megatron's own
    validation of fused kernels needs the real TE)."""
    import types

    import megatron.core.transformer as mt

    from megatron_trapo.models import provider
    from megatron_trapo.train.pretrained import model_config_from_checkpoint

    ckpt = fake_checkpoint(tmp_path / "ckpt", CKPT_MODEL)
    cfg = load_config(TrainConfig, overrides=[f"load={ckpt}", *overrides])
    model = runtime_model(model_config_from_checkpoint(cfg.load), cfg.model)
    if te:
        monkeypatch.setattr(provider, "have_transformer_engine", lambda: True)
        monkeypatch.setattr(mt, "TransformerConfig", lambda **kw: types.SimpleNamespace(**kw))
    return model, provider.transformer_config(model, ParallelConfig())


def test_fp8_fields_reach_the_transformer_config_when_loading(tmp_path, monkeypatch):
    model, tc = built_config(tmp_path, monkeypatch, "model.fp8=e4m3",
                             "model.fp8_recipe=blockwise", "model.first_last_layers_bf16=true",
                             te=True)
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (4, 128, 500)
    assert tc.fp8 == "e4m3" and tc.fp8_recipe == "blockwise"
    assert tc.first_last_layers_bf16 and tc.num_layers_at_start_in_bf16 == 1
    assert model.params_dtype == "bf16" and tc.bf16  # the checkpoint's dtype


def test_recompute_flags_reach_the_transformer_config(tmp_path, monkeypatch):
    _, tc = built_config(tmp_path, monkeypatch, "model.recompute_granularity=full",
                         "model.recompute_method=uniform", "model.recompute_num_layers=1",
                         "model.params_dtype=fp16")
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "uniform", 1)
    assert tc.fp16 and not tc.bf16  # an explicit params_dtype wins over the checkpoint's
    _, sel = built_config(tmp_path / "b", monkeypatch, "model.recompute_granularity=selective")
    assert sel.recompute_granularity == "selective" and sel.recompute_method is None


def test_explicit_fp32_wins_over_a_bf16_checkpoint(tmp_path, monkeypatch):
    # fp32 used to be the default, so asking for it could not be told from not asking
    model, tc = built_config(tmp_path, monkeypatch, "model.params_dtype=fp32")
    assert model.params_dtype == "fp32" and not tc.bf16 and tc.params_dtype == torch.float32
    fresh = ModelConfig()  # no checkpoint: auto builds fp32
    assert fresh.params_dtype == "auto" and fresh.dtype == "fp32"


def test_conflicting_architecture_field_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="model.hidden_size=256 conflicts"):
        runtime_model(CKPT_MODEL, ModelConfig(hidden_size=256))
    same = runtime_model(CKPT_MODEL, ModelConfig(hidden_size=128, fp8="hybrid"))
    assert same.hidden_size == 128 and same.fp8 == "hybrid"


def test_bad_runtime_combinations_are_refused():
    with pytest.raises(ConfigError, match="recompute_method"):
        ModelConfig(recompute_granularity="full")
    with pytest.raises(ConfigError, match="delayed"):
        ModelConfig(fp8_recipe="delayed", first_last_layers_bf16=True)
    with pytest.raises(ConfigError, match="recompute_granularity"):
        ModelConfig(recompute_granularity="everything")


def test_grad_accumulation_fusion_only_with_apex(tmp_path, monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    _, tc = built_config(tmp_path, monkeypatch, te=True)
    assert tc.bias_activation_fusion and not tc.gradient_accumulation_fusion
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    _, tc = built_config(tmp_path / "b", monkeypatch, te=True)
    assert tc.gradient_accumulation_fusion


def test_context_parallel_training_is_refused_until_batches_are_split():
    with pytest.raises(ConfigError, match="context_parallel_size=2: the trainer does not split"):
        load_config(TrainConfig, overrides=["parallel.context_parallel_size=2"])


def test_optimizer_memory_knobs_are_validated():
    from megatron_trapo.config import OptimizerConfig

    with pytest.raises(ConfigError, match="optimizer_cpu_offload needs optimizer.use_distributed"):
        OptimizerConfig(optimizer_cpu_offload=True)
    with pytest.raises(ConfigError, match="overlap_param_gather needs optimizer.overlap_grad"):
        OptimizerConfig(use_distributed_optimizer=True, overlap_param_gather=True)
    OptimizerConfig(use_distributed_optimizer=True, optimizer_cpu_offload=True,
                    use_precision_aware_optimizer=True)
