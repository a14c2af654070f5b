"""The memory planner against numbers worked by hand, the example configs' plans, and a layout
it refuses with its reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trapo.config import TrainConfig, load_config
from megatron_trapo.launch import memory as M
from megatron_trapo.launch.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024 ** 3
SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
         "model.params_dtype=bf16", "model.untie_embeddings_and_output_weights=true",
         "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
         "parallel.sequence_parallel=true", "optimizer.use_distributed_optimizer=true",
         "batching.max_tokens_per_microbatch=1024", "launch.gpus_per_node=4", "launch.trainer_nodes=2",
         "launch.gpu=a100-40gb", "launch.server_mem_fraction=0.5", "rollout.engine=sglang",
         "prompts_per_step=2", "loss.max_response_length=100"]


def plan(*extra):
    return build_plan(load_config(TrainConfig, None, SMALL + list(extra)), nodes=3,
                      prompt_tokens=28)


def test_stage_memory_equals_the_hand_worked_numbers():
    p = plan()
    assert p["layout"] == {"world_size": 8, "tp": 2, "pp": 2, "cp": 1, "dp": 2,
                           "sequence_parallel": True, "trainer_nodes": 2,
                           "gpus_per_trainer_node": 4}
    # One layer: qkv 64·(64 + 2·32) = 8192, proj 64·64 = 4096, SwiGLU 3·64·128 = 24576
    # → 36864 sharded / TP 2 = 18432, + 2 RMSNorm weights 2·64 = 128 replicated = 18560.
    # Stage 0: 2 layers + embedding 256·64/2 = 8192 → 45312. Stage 1: 2 layers + final norm 64
    # + output layer 8192 → 45376.
    s0, s1 = p["stages"]
    assert (s0["params_million"], s1["params_million"]) == (0.05, 0.05)
    params = {0: 45312, 1: 45376}
    # activations per token per layer: norm/linear inputs 8·64 = 512 / TP (SP) = 256; q and
    # attention output 4·64 = 256, k and v 4·32 = 128, SwiGLU 6·128 = 768, softmax stats 4·4 =
    # 16 → 1168 / TP = 584; total 840 bytes. × 2 layers × 1024 tokens = 1 720 320 per
    # micro-batch; 1F1B: stage 0 holds 2 micro-batches, stage 1 one.
    acts = {0: 840 * 2 * 1024 * 2, 1: 840 * 2 * 1024 * 1}
    # logits on the last stage, fused output layer (the default): only the fp32 chunk
    # temporaries, 12·1024·128 = 1 572 864 (a chunk of 2^24 / 128 rows holds all 1024 tokens)
    logits = {0: 0, 1: 1572864}
    for st in (s0, s1):
        r = st["pp_rank"]
        mg = st["memory_gib"]
        want = {"weights": params[r] * 2, "grads": params[r] * 4,
                "optimizer": params[r] * 12 / 2,  # fp32 master + 2 moments, sharded over DP 2
                "activations": acts[r], "logits": logits[r]}
        for key, value in want.items():
            assert mg[key] == pytest.approx(round(value / GIB, 2), abs=0.006), key
        cfg = load_config(TrainConfig, None, SMALL)
        exact = M.plan_trainer(cfg.model, cfg, 2)[r].memory_gib  # before rounding
        for key, value in want.items():
            assert exact[key] * GIB == pytest.approx(value, rel=1e-9), key


def test_unfused_output_layer_adds_the_bf16_logits_and_their_gradient():
    cfg = load_config(TrainConfig, None, SMALL + ["loss.fused_output_layer=false",
                                                  "loss.logprob_chunk_size=256"])
    st = M.plan_trainer(cfg.model, cfg, 2)[1]
    # output [1024, 128] bf16 + its grad = 2·2·1024·128 = 524 288; chunks 12·256·128 = 393 216
    assert st.memory_gib["logits"] * GIB == pytest.approx(524288 + 393216, rel=1e-9)


def test_full_recompute_keeps_layer_inputs_and_one_recomputed_layer():
    cfg = load_config(TrainConfig, None, SMALL + ["model.recompute_granularity=full",
                                                  "model.recompute_method=uniform",
                                                  "model.recompute_num_layers=1"])
    st = M.plan_trainer(cfg.model, cfg, 2)[1]
    # each of the 2 layers keeps its input, 2·64 / TP(SP) · 1024 = 65 536 bytes, and one layer
    # is recomputed in backward at a time (840 · 1024 = 860 160)
    assert st.memory_gib["activations"] * GIB == pytest.approx(2 * 65536 + 860160)


def test_servers_kv_cache_and_sync_volume():
    p = plan()
    sv = p["servers"]
    # 4 "GPUs" of node 3, one TP-1 server each; HF parameters (unpadded): embeddings 2·256·64,
    # 4 layers of 12 288 + 24 576 + 128, a final norm: 180 800 → 361 600 bytes in bf16
    assert sv["count"] == 4 and sv["tp"] == 1
    weights = 180800 * 2
    assert sv["weights_gib"] == pytest.approx(round(weights / GIB, 2))
    # KV per token: k and v × 4 layers × 2 heads × 16 dims × 2 bytes = 512
    assert sv["kv_bytes_per_token"] == 512
    assert sv["kv_tokens"] == int((0.5 * 40 * GIB - weights) // 512)
    assert sv["concurrent_full_length_sequences"] == sv["kv_tokens"] // 128  # 28 + 100 tokens
    assert p["weight_sync_gib_per_step"] == round(weights / GIB, 2)
    # micro-batching: 2 prompts × 8 samples × 128 tokens = 2048, 1024 per DP rank, 1 row
    assert p["microbatching"]["step_tokens_max"] == 2048
    assert p["microbatching"]["microbatches_per_step_max"] == 1


def test_example_configs_fit_with_headroom():
    for cfg, nodes in (("trapo_qwen2.5_32b.yaml", 6), ("trapo_qwen2.5_math_7b.yaml", 1)):
        p = build_plan(load_config(TrainConfig, ROOT / "examples/configs" / cfg), nodes)
        assert p["fits"] and p["headroom_ok"], (cfg, p["problems"], p["stages"])
    p32 = build_plan(load_config(TrainConfig, ROOT / "examples/configs/trapo_qwen2.5_32b.yaml"), 6)
    assert p32["layout"]["dp"] == 2 and len(p32["stages"]) == 2
    assert p32["model"]["params_billion"] == pytest.approx(32.76, abs=0.01)


def test_a_layout_that_cannot_fit_is_refused_with_the_term_to_change():
    cmd = [sys.executable, "-m", "megatron_trapo.cli", "plan", "--config",
           str(ROOT / "examples/configs/trapo_qwen2.5_32b.yaml"), "--nodes", "2", "--json",
           "launch.trainer_nodes=1", "parallel.pipeline_model_parallel_size=1",
           "model.recompute_granularity=null", "model.recompute_method=null",
           "model.recompute_num_layers=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    p = json.loads(proc.stdout)
    assert not p["fits"]
    stage = p["stages"][0]["memory_gib"]
    assert stage["total"] > 79.65 - M.RESERVED_GIB
    # DP = 1: the whole fp32 master + Adam state, 12 bytes × 4.1 B parameters per GPU
    assert stage["optimizer"] == max(v for k, v in stage.items() if k != "total")
    assert "the largest term is optimizer" in p["problems"][0]
    assert "shards it over DP=1: add data-parallel ranks" in p["problems"][0]


def test_unknown_gpu_and_missing_architecture_are_clear_errors(tmp_path):
    cmd = [sys.executable, "-m", "megatron_trapo.cli", "plan", "--config",
           str(ROOT / "examples/configs/trapo_qwen2.5_32b.yaml"), "--gpu", "tpu-v5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "launch.gpu='tpu-v5' is not one of" in proc.stderr
    proc = subprocess.run(cmd[:-2] + ["launch.model_preset=null"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "is not readable here" in proc.stderr
