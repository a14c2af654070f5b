"""The CPU trainer's memory plan: the parameter count against a real model's, the terms as the
module docstring states them, a run that cannot fit refused in one line, and the micro-batch
budget lowered to what fits."""
import dataclasses
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_trapo.config import ConfigError, TrainConfig, load_config
from megatron_trapo.models.hf.mapping import model_to_hf_config
from megatron_trapo.models.presets import preset
from megatron_trapo.train.cpu_memory import GIB, _params, plan_cpu_memory

SMOL = dataclasses.replace(preset("tiny"), num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                           num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                           max_position_embeddings=2048)


def cfg(*extra):
    return load_config(TrainConfig, None, ["prompts_per_step=2", "loss.max_response_length=256",
                                           *extra])


def test_parameter_count_is_the_real_models(tmp_path):
    for m in (preset("tiny"), dataclasses.replace(preset("tiny"),
                                                  untie_embeddings_and_output_weights=True)):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_to_hf_config(m)))
        assert _params(m) == sum(p.numel() for p in hf.parameters())


def test_terms_per_rank():
    c = cfg()
    plan = plan_cpu_memory(c, SMOL, generates=True, dp=2, max_prompt_tokens=144,
                           speculative=False, ranks=2, available_gib=24.0)
    n = _params(SMOL)
    f = plan.fixed_gib
    assert f["weights"] == pytest.approx(4 * n / GIB) and f["grads"] == f["weights"]
    assert f["optimizer"] == pytest.approx(8 * n / GIB)  # Adam's two fp32 moments
    # the engine shares the trainer's tensors but q, k, v (576 × (9 + 2·3) × 64) in each of 30
    # layers (gate and up are views of linear_fc1)
    assert f["engine_weights"] == pytest.approx(30 * 576 * 15 * 64 * 4 / GIB)
    copy = plan_cpu_memory(cfg("rollout.share_trainer_weights=false"), SMOL, True, 2, 144,
                           False, ranks=2, available_gib=24.0)
    assert copy.fixed_gib["engine_weights"] == f["weights"]  # rollout.dtype fp32: a full copy
    # 1 prompt per rank × 4 rows (the largest level) × 400 tokens × k, v × 30 layers × 3 × 64
    assert f["engine_kv_cache"] == pytest.approx(4 * 400 * 2 * 30 * 3 * 64 * 4 / GIB)
    assert plan.sequence_tokens == 400 and plan.microbatch_tokens == 1024  # room: the default
    # sharded Adam, speculative levels (4 + 2·2 + 2·1 + 1 rows), selective recompute
    local = dataclasses.replace(SMOL, attention_backend="local")
    selective = dataclasses.replace(local, recompute_granularity="selective")
    spec = plan_cpu_memory(cfg("optimizer.use_distributed_optimizer=true"), selective, True, 2,
                           144, speculative=True, ranks=2, available_gib=24.0)
    assert spec.fixed_gib["optimizer"] == pytest.approx(f["optimizer"] / 2)
    assert spec.fixed_gib["engine_kv_cache"] == pytest.approx(f["engine_kv_cache"] * 11 / 4)
    # megatron's unfused attention keeps every layer's scores (2 × 9 heads × 400 × 4 B), the
    # default SDPA attention none, selective recompute one layer's of 30
    unfused_attention = plan_cpu_memory(c, local, True, 2, 144, False, ranks=2,
                                        available_gib=24.0)
    assert unfused_attention.activation_bytes_per_token - plan.activation_bytes_per_token == \
        pytest.approx(30 * 2 * 9 * 400 * 4)
    assert unfused_attention.activation_bytes_per_token - spec.activation_bytes_per_token == \
        pytest.approx(29 * 2 * 9 * 400 * 4)
    unfused = plan_cpu_memory(cfg("loss.fused_output_layer=false"), SMOL, True, 2, 144, False,
                              ranks=2, available_gib=24.0)
    # without the fused output layer: the fp32 logits and their gradient, 8 B per vocab entry
    assert unfused.activation_bytes_per_token - plan.activation_bytes_per_token == \
        pytest.approx(8 * 49152)


def test_budget_is_lowered_to_what_fits_and_a_run_that_cannot_fit_is_refused():
    c = cfg()
    roomy = plan_cpu_memory(c, SMOL, True, 2, 144, False, ranks=2, available_gib=24.0)
    # room for about 600 tokens of activations per rank
    fixed = sum(roomy.fixed_gib.values())
    tight = 2 * (fixed + 600 * roomy.activation_bytes_per_token / GIB)
    plan = plan_cpu_memory(c, SMOL, True, 2, 144, False, ranks=2, available_gib=tight)
    assert plan.microbatch_tokens == 576  # 600 rounded down to 64
    assert plan.total_gib(plan.microbatch_tokens) <= plan.per_rank_gib
    with pytest.raises(ConfigError) as err:
        plan_cpu_memory(cfg("batching.cpu_memory_target_gb=6"), SMOL, True, 2, 144, False,
                        ranks=2)
    msg = str(err.value)
    assert "more than the 6.0 GiB of batching.cpu_memory_target_gb" in msg
    assert "optimizer 1.0" in msg and "optimizer.use_distributed_optimizer=true" in msg


def test_the_cli_refuses_a_run_that_cannot_fit_in_one_line(tmp_path):
    from rollout_models import tiny_qwen2

    tok = tiny_qwen2(tmp_path / "m", max_positions=256)
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2", "solutions": ["\\\\boxed{2}"]}\n')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=1", "-m", "megatron_trapo.cli", "train",
                           f"train_data={data}", f"rollout.tokenizer_path={tok}",
                           "batching.cpu_memory_target_gb=0.01", f"log_dir={tmp_path / 'l'}"],
                          capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if "megatron-trapo: error:" in line]
    assert len(ours) == 1 and "more than the 0.0 GiB of batching.cpu_memory_target_gb" in ours[0]
    # torchrun prints its own traceback of the child's exit code; none comes from our code
    assert "exitcode  : 2" in proc.stderr and "megatron_trapo/" not in proc.stderr
