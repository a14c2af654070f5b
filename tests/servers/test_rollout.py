"""Rollout engines against one contract, on a tiny random Qwen2 with a locally trained
tokenizer: the HF engine in-process, the SGLang client through the real sglang-router in
front of two protocol servers, and the vLLM client against the servers' /v1/completions.
Plus failover (a server killed mid-batch), weight sync (TP=2 and PP=2 trainers, three modes)
and clear errors."""
import contextlib
import json
import math
import os
import signal
import threading
import time

import pytest

from rollout_models import tiny_qwen2

from launch import run_tool, run_worker
from workers.results import Fp8SyncSuite, WeightSyncSuite
from megatron_trapo.rollout.hf_engine import HFEngine
from megatron_trapo.rollout.servers import ServerPool
from megatron_trapo.rollout.sglang_engine import SGLangEngine
from megatron_trapo.rollout.types import RolloutError, RolloutRequest, SamplingParams
from megatron_trapo.rollout.vllm_engine import VLLMEngine

PROMPTS = [[5, 6, 7, 8], [30, 31], [100, 101, 102, 103, 104, 105], [9]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("tinyqwen") / "hf")


@pytest.fixture(scope="module")
def engines(model_dir):
    pool = ServerPool.launch("hf", str(model_dir), 2, use_router=True,
                             tokenizer_path=str(model_dir), startup_timeout_s=120)
    hf = HFEngine(str(model_dir), tokenizer_path=str(model_dir))
    sg = SGLangEngine(pool)
    vl = VLLMEngine(list(pool.urls), model=str(model_dir))
    yield {"hf": hf, "sglang": sg, "vllm": vl}
    vl.close()
    sg.close()


ENGINES = ["hf", "sglang", "vllm"]


def test_greedy_outputs_equal_across_engines(engines):
    reqs = [RolloutRequest(p, SamplingParams(temperature=0, max_new_tokens=12)) for p in PROMPTS]
    outs = {name: [s[0].token_ids for s in engines[name].generate(reqs)] for name in ENGINES}
    assert all(len(t) == 12 for t in outs["hf"])
    assert outs["hf"] == outs["sglang"] == outs["vllm"]


@pytest.mark.parametrize("name", ENGINES)
def test_logprobs_equal_teacher_forced_forward(engines, name):
    reqs = [RolloutRequest(p, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3))
            for p in PROMPTS[:2]]
    ref = engines["hf"]
    for req, samples in zip(reqs, engines[name].generate(reqs)):
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids) >= 1
            assert len(s.token_ids) == 10 or s.finish_reason == "stop"
            tf = ref.teacher_forced_logprobs(req.input_ids(), s.token_ids)
            assert max(abs(a - b) for a, b in zip(tf, s.logprobs)) <= 1e-4


@pytest.mark.parametrize("name", ENGINES)
def test_n_samples_distinct_seeds_reproducible(engines, name):
    req = RolloutRequest(PROMPTS[0], SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=11))
    first = [s.token_ids for s in engines[name].generate([req])[0]]
    again = [s.token_ids for s in engines[name].generate([req])[0]]
    assert len(first) == 4 and len({tuple(t) for t in first}) >= 3  # distinct seeds → distinct
    assert first == again  # same seeds → same samples
    if name != "hf":  # every engine samples the same way from the same seed
        assert first == [s.token_ids for s in engines["hf"].generate([req])[0]]


@pytest.mark.parametrize("name", ENGINES)
def test_prefix_conditioning(engines, name):
    prefix = [40, 41, 42]
    with_prefix = RolloutRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=10),
                                 prefix_ids=prefix)
    as_prompt = RolloutRequest(PROMPTS[1] + prefix, SamplingParams(temperature=0, max_new_tokens=7))
    a, b = engines[name].generate([with_prefix, as_prompt])
    assert a[0].token_ids == b[0].token_ids  # continues the prefix
    assert len(a[0].token_ids) == 7  # the prefix used 3 of the 10-token budget
    assert a[0].prefix_len == 3 and a[0].token_ids[:3] != prefix
    full = RolloutRequest(PROMPTS[1], SamplingParams(max_new_tokens=3), prefix_ids=prefix)
    empty = engines[name].generate([full])[0][0]
    assert empty.token_ids == [] and empty.logprobs == []


@pytest.mark.parametrize("name", ["hf", "sglang"])
def test_prompt_longer_than_context_is_a_clear_error(engines, name):
    with pytest.raises(RolloutError, match="context"):
        engines[name].generate([RolloutRequest(list(range(300)), SamplingParams(max_new_tokens=4))])


def test_stop_tokens_end_samples(engines):
    greedy = engines["hf"].generate([RolloutRequest(PROMPTS[0], SamplingParams(
        temperature=0, max_new_tokens=12))])[0][0].token_ids
    stop = greedy[4]
    for name in ENGINES:
        s = engines[name].generate([RolloutRequest(PROMPTS[0], SamplingParams(
            temperature=0, max_new_tokens=12, stop_token_ids=[stop]))])[0][0]
        assert s.finish_reason == "stop" and s.token_ids == greedy[:greedy.index(stop) + 1]


def test_vllm_engine_sends_the_served_model_name(engines, model_dir):
    # an evaluation names the model by its local path; the server was started under another
    other = VLLMEngine(list(engines["vllm"].urls), model="/mnt/elsewhere/model")
    assert other.model == str(model_dir)  # from /v1/models
    req = [RolloutRequest(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=4))]
    assert other.generate(req)[0][0].token_ids == engines["hf"].generate(req)[0][0].token_ids
    other.close()


def test_sglang_warns_once_when_servers_ignore_seeds(engines, monkeypatch, caplog):
    """SGLang reads sampling_seed only with --enable-deterministic-inference (its /server_info
    reports the flag); without it seeded rollouts are silently not reproducible."""
    import logging

    sg = engines["sglang"]
    assert sg.servers_ignoring_seeds() == []  # the protocol server honours seeds
    monkeypatch.setattr(sg, "_server_info", lambda url: {"tp_size": 1, "pp_size": 1,
                                                         "enable_deterministic_inference": False})
    monkeypatch.setattr(sg, "_warned_seeds", False)
    seeded = [RolloutRequest(PROMPTS[0], SamplingParams(n=2, max_new_tokens=2, seed=5))]
    with caplog.at_level(logging.WARNING, logger="megatron_trapo.rollout.sglang_engine"):
        sg.generate([RolloutRequest(PROMPTS[0], SamplingParams(max_new_tokens=2))])  # unseeded
        assert not caplog.records
        sg.generate(seeded)
        sg.generate(seeded)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "--enable-deterministic-inference" in warnings[0]
    assert all(u in warnings[0] for u in sg.pool.urls)


def test_tokenizer_model_mismatch(model_dir, tmp_path):
    from megatron_trapo.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([f"word{i} " * 3 for i in range(2000)], 600, tmp_path)
    with pytest.raises(RolloutError, match="tokenizer/model mismatch"):
        HFEngine(str(model_dir), tokenizer_path=str(tmp_path))


def test_server_that_never_becomes_healthy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    t0 = time.time()
    with pytest.raises(RolloutError, match="exited with code .* before becoming healthy"):
        ServerPool.launch("hf", str(tmp_path), 1, use_router=False, startup_timeout_s=120)
    assert time.time() - t0 < 120


def test_server_killed_mid_batch_every_sample_exactly_once(model_dir):
    pool = ServerPool.launch("hf", str(model_dir), 2, use_router=True, startup_timeout_s=120)
    engine = SGLangEngine(pool, request_timeout_s=60, max_retries=4)
    try:
        prompts = [[i % 250 + 3, (7 * i) % 250 + 3, 11] for i in range(96)]
        reqs = [RolloutRequest(p, SamplingParams(temperature=0, max_new_tokens=48)) for p in prompts]
        expected = [s[0].token_ids for s in HFEngine(str(model_dir)).generate(reqs)]
        victim = pool.processes[1]
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=engine.generate(reqs)))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive()  # the batch is still running when the server dies
        os.killpg(victim.proc.pid, signal.SIGKILL)
        worker.join(timeout=300)
        out = result["out"]
        assert [len(s) for s in out] == [1] * 96
        assert [s[0].token_ids for s in out] == expected  # none lost, duplicated or swapped
        assert victim.url in engine.dead_servers
        assert victim.url not in pool.urls and len(pool.urls) == 1
    finally:
        engine.close()


@contextlib.contextmanager
def sync_servers(model_path):
    """The weight-sync tests' servers, from ``model_path``: one for disk sync, and two of TP
    size 2 for broadcast sync (``extra_args``: our server's stand-in TP ranks)."""
    disk = ServerPool.launch("hf", str(model_path), 1, use_router=False, startup_timeout_s=120)
    try:
        tp2 = ServerPool.launch("hf", str(model_path), 2, use_router=False,
                                startup_timeout_s=120, extra_args=["--tp-size", "2"])
        try:
            yield disk, tp2
        finally:
            tp2.close()
    finally:
        disk.close()


def test_weight_sync_tp2_pp2_three_modes(model_dir, tmp_path):
    """TP=2 and PP=2 trainers sync to the HF engine, to a server from disk (through
    SGLang's endpoints, then vLLM's pause / reload / cache reset / resume), and by
    broadcast to two protocol servers of TP size 2 each (ranks 1-2 and 3-4 of a group of 5);
    one of those then dies in the middle of a sync, which is done again on the survivor.
    PP=2 syncs run with host copies and CPU-tensor p2p refused."""
    mc = tmp_path / "mc"
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(model_dir), "--out-dir", str(mc), "--tp", "2")
    with sync_servers(model_dir) as (disk, tp2):
        r = run_worker("weight_sync.py", 2, tmp_path, env={
            "MC_DIR": str(mc), "HF_DIR": str(model_dir), "DISK_URL": disk.urls[0],
            "TP2_URLS": ",".join(tp2.urls), "VICTIM_PGID": str(tp2.processes[1].proc.pid)},
            result=WeightSyncSuite)
    keys = ["tp2:inprocess", "tp2:disk", "tp2:vllm-disk", "tp2:distributed", "pp2:inprocess",
            "pp2:distributed"]
    for key in keys:
        after = r.checks[f"{key}:after"]
        assert after.tokens == 10
        assert after.diff <= 1e-4, key
        assert after.sample_version == after.engine_version == after.expected_version
        assert after.buckets > 1  # streamed in several size-bounded buckets
        if key.startswith("tp2"):
            assert r.checks[f"{key}:before"].diff > 1e-2  # the engine had other weights before
    for server in ("server0", "server1"):
        assert r.checks[f"tp2:distributed:{server}"].diff <= 1e-4
    # PP=2: stage 1's tensors reached stage 0 by device-resident p2p, no host copy
    assert r.device_p2p_calls["pp2:inprocess"] > 0 and r.device_p2p_calls["pp2:distributed"] > 0
    killed = r.checks["tp2:after_kill"]  # killed during the sync: done again on the survivor
    assert killed.diff <= 1e-4 and killed.rebuilds == 1 and len(killed.live) == 1
    assert killed.attempts == 2
    assert killed.sample_version == "tp2-after-kill"


def test_fp8_weight_sync_reaches_servers_from_disk_and_by_broadcast(model_dir, tmp_path):
    """rollout.quantization=fp8 on the servers' paths: servers started from the FP8 export
    (tools/quantize_fp8.py, 32x32 blocks) take a TP=2 trainer's weights as fp8 tensors +
    scales, from disk (config.json with quantization_config) and by broadcast (fp8 sent as
    its bytes over gloo to two servers of TP size 2), and then generate exactly what the
    in-process engine does with the same weights quantized in the trainer; the weights
    differ from the unquantized ones (so the fp8 values, not a float copy, arrived)."""
    mc = tmp_path / "mc"
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(model_dir), "--out-dir", str(mc), "--tp", "2")
    fp8_dir = tmp_path / "fp8"
    printed = run_tool("quantize_fp8.py", str(model_dir), str(fp8_dir), "--block-size", "32", "32")
    assert "14 fp8 weights" in printed  # 2 layers x (q, k, v, o, gate, up, down)
    with sync_servers(fp8_dir) as (disk, tp2):
        r = run_worker("fp8_sync.py", 2, tmp_path, env={
            "MC_DIR": str(mc), "HF_DIR": str(model_dir), "DISK_URL": disk.urls[0],
            "TP2_URLS": ",".join(tp2.urls)}, result=Fp8SyncSuite)
    ref = r.checks["reference"]
    # measured: 1.09 nats at most over the 10 tokens (this model's logits are scaled x40)
    assert ref.tokens == 10 and ref.diff_to_unquantized > 1e-4
    for mode in ("disk", "distributed"):
        c = r.checks[mode]
        assert c.same_tokens and c.tokens == 10, mode
        assert c.diff_to_reference <= 1e-5, (mode, c.diff_to_reference)
        assert c.diff_to_unquantized > 1e-4, mode
        assert c.sample_version == f"fp8-{mode}" and c.buckets > 1
    written = json.loads(next((tmp_path / "ckpt").glob("v*/config.json")).read_text())
    assert written["quantization_config"]["weight_block_size"] == [32, 32]
    assert written["quantization_config"]["quant_method"] == "fp8"


def test_hf_engine_prefills_each_distinct_input_once(engines):
    """A group's samples share their prompt: the engine prefills it once and copies its KV
    cache to every sample's row. Each copy then samples exactly what the sample would alone
    (its own seed, untouched by its neighbours' tokens)."""
    hf = engines["hf"]
    batches = []
    logit_shapes = []
    hook = hf.model.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    out_hook = hf.model.register_forward_hook(
        lambda mod, args, out: logit_shapes.append(tuple(out.logits.shape)))
    try:
        group = [RolloutRequest(PROMPTS[0], SamplingParams(n=4, temperature=1.0,
                                                           max_new_tokens=8, seed=21)),
                 RolloutRequest(PROMPTS[1], SamplingParams(n=3, temperature=1.0,
                                                           max_new_tokens=8, seed=5))]
        together = hf.generate(group)
        prefill = batches[0]
        batches.clear()
        alone = [hf.generate([RolloutRequest(r.prompt_ids, SamplingParams(
            n=1, temperature=1.0, max_new_tokens=8, seed=r.sampling.seed + j))])[0][0]
            for r in group for j in range(r.sampling.n)]
    finally:
        hook.remove()
        out_hook.remove()
    assert prefill[0] == 2  # two distinct prompts prefilled, not seven rows
    assert logit_shapes[0][:2] == (2, 1)  # the prefill keeps the last position's logits only
    assert [s.token_ids for samples in together for s in samples] == [s.token_ids for s in alone]
    for a, b in zip([s for samples in together for s in samples], alone):
        # fp32 rounding: a batched matmul sums in another order than a one-row one (MKL's
        # blocking depends on the batch), so the error grows with the logit's size
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5)
                   for x, y in zip(a.logprobs, b.logprobs)), (a.logprobs, b.logprobs)
