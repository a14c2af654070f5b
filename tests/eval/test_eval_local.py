"""``megatron-trapo eval`` without Slurm: per-sample output and summary, resume after a killed
run, a Megatron checkpoint converted on the fly, clear errors."""
import json
import shutil

from eval_helpers import EVAL_ARGS, cli, rows

from megatron_trapo.eval.metrics import summarize
from megatron_trapo.eval.shards import sample_seed


def test_local_run_writes_samples_and_summary(reference_run):
    got = rows(reference_run)
    assert len(got) == 2 * 3 * 2
    assert {(r["benchmark"], r["problem_id"], r["sample_index"]) for r in got} == \
        {(b, p, s) for b in ("gsm8k", "math500") for p in range(3) for s in range(2)}
    for r in got:
        assert r["seed"] == sample_seed(5, r["benchmark"], r["problem_id"]) + r["sample_index"]
        assert set(r) >= {"text", "extracted", "correct", "grader", "answer", "finish_reason"}
        assert 1 <= r["num_tokens"] <= 24
    assert got[0]["answer"] == "18"  # gsm8k row 0's ground truth
    # the taught model answers: verdicts are a mix, graded from the extracted boxed answers
    assert {r["correct"] for r in got} == {True, False}
    for r in got:
        assert r["grader"] in ("math_verify", "prm800k", "both", "no_answer")
        assert (r["extracted"] is None) == (r["grader"] == "no_answer")
        assert r["correct"] == (r["grader"] in ("math_verify", "prm800k"))
    # samples of one problem differ (distinct seeds), i.e. sampling at T=0.6 really happened
    assert len({r["text"] for r in got if r["benchmark"] == "math500"}) > 1
    summary = json.loads((reference_run / "summary.json").read_text())
    for bench in ("gsm8k", "math500"):
        verdicts = {}
        for r in got:
            if r["benchmark"] == bench:
                verdicts.setdefault(r["problem_id"], []).append(r["correct"])
        assert summary["benchmarks"][bench]["pass@2"] == summarize(verdicts)["pass@2"]
        assert sum(summary["benchmarks"][bench]["graders"].values()) == 6
    md = (reference_run / "summary.md").read_text()
    assert md.startswith("| benchmark | problems | k | score (avg@k) | pass@1 | pass@2 |")
    assert "| gsm8k | 3 | 2 |" in md and "**average**" in md


def test_rerun_skips_what_is_written(reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    # A killed task: shard 5 has one graded sample in its partial file (its text marked, so
    # that a regenerated sample would show), plus a line cut off mid-write; shard 6 is gone.
    shards = sorted((out / "shards").glob("*.jsonl"))
    five, six = shards[5], shards[6]
    first, second = five.read_text().splitlines()
    kept = dict(json.loads(first), text="KEPT FROM THE PARTIAL FILE")
    five.unlink()
    five.with_name(five.name.replace(".jsonl", ".partial.jsonl")).write_text(
        json.dumps(kept) + "\n" + second[:30])
    six_text = six.read_text()
    six.unlink()
    untouched = {p: p.stat().st_mtime_ns for p in shards if p not in (five, six)}
    (out / "summary.json").unlink()
    cli("eval", "--config", str(out / "eval_config.yaml"), f"output_dir={out}")
    assert five.read_text().splitlines() == [json.dumps(kept), second]
    assert not five.with_name(five.name.replace(".jsonl", ".partial.jsonl")).exists()
    assert six.read_text() == six_text  # regenerated identically (fixed seeds)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert (out / "summary.json").is_file()


def test_megatron_checkpoint_is_converted_on_the_fly(mcore_checkpoint, reference_run, tmp_path):
    out = tmp_path / "out"
    cli("eval", f"load={mcore_checkpoint}", f"output_dir={out}", *EVAL_ARGS)
    assert (out / "hf_model" / "config.json").is_file()
    assert rows(out) == rows(reference_run)  # an exact conversion gives the same samples


def test_bad_input_is_named(tiny_model, tmp_path):
    proc = cli("eval", f"output_dir={tmp_path / 'a'}", *EVAL_ARGS, check=False)
    assert proc.returncode == 2 and "model_path (an HF folder) or load" in proc.stderr
    proc = cli("eval", f"model_path={tiny_model}", "benchmarks=[aime2099]", check=False)
    assert proc.returncode == 2 and "unknown benchmark 'aime2099'" in proc.stderr
    proc = cli("eval", f"model_path={tiny_model}", "temperature=-1", check=False)
    assert proc.returncode == 2 and "temperature must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_vllm_engine_against_running_servers_gives_the_local_samples(tiny_model, reference_run,
                                                                      tmp_path):
    """engine=vllm attached to a server started beforehand (our server's /v1/completions):
    same samples as the HF engine, the seeds being per sample."""
    from megatron_trapo.rollout.servers import ServerPool

    pool = ServerPool.launch("hf", str(tiny_model), 1, use_router=False,
                             startup_timeout_s=120)
    try:
        out = tmp_path / "out"
        cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS,
            "rollout.engine=vllm", f"rollout.server_urls=['{pool.urls[0]}']")
    finally:
        pool.close()
    assert rows(out) == rows(reference_run)


def test_new_weights_at_the_same_path_are_not_served_old_results(tiny_model, tmp_path):
    """Probe 6g: weights copied over model_path used to leave samples.jsonl byte-identical."""
    import torch
    from transformers import AutoModelForCausalLM

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model, model)
    cli("eval", f"model_path={model}", f"output_dir={out}", *EVAL_ARGS)
    before = rows(out)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # other weights, same path
    m.save_pretrained(model)
    proc = cli("eval", f"model_path={model}", f"output_dir={out}", *EVAL_ARGS, check=False)
    assert proc.returncode == 2 and "holds results of something else: model files changed" \
        in proc.stderr and "--force" in proc.stderr
    cli("eval", f"model_path={model}", f"output_dir={out}", *EVAL_ARGS, "--force")
    after = rows(out)
    assert len(after) == len(before) and [r["text"] for r in after] != [r["text"] for r in before]


def test_a_prompt_longer_than_the_context_is_a_sample_verdict(tiny_model, tmp_path):
    """A problem whose prompt does not fit the model used to fail its whole shard (the engine
    refuses it); now its samples are recorded as prompt_too_long and counted."""
    from transformers import AutoTokenizer

    from megatron_trapo.config import EvalConfig
    from megatron_trapo.eval import registry
    from megatron_trapo.eval.runner import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = EvalConfig(model_path=str(tiny_model))
    lengths = {(b, p.index): len(prompt_ids(cfg, tok, p.problem))
               for b in ("gsm8k", "math500") for p in registry.get(b).load(3)}
    context = sorted(lengths.values())[len(lengths) // 2]  # about half do not fit
    too_long = {k for k, n in lengths.items() if n >= context}
    assert 0 < len(too_long) < len(lengths)
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = context
    (model / "config.json").write_text(json.dumps(config))
    cli("eval", f"model_path={model}", f"output_dir={out}", *EVAL_ARGS)
    got = rows(out)
    assert len(got) == 6 * 2  # every sample of every problem is there
    for r in got:
        long = (r["benchmark"], r["problem_id"]) in too_long
        assert (r["finish_reason"] == "prompt_too_long") == long, r
        if long:
            assert r["grader"] == "prompt_too_long" and not r["correct"] and r["text"] == ""
        else:
            assert r["num_tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for bench in ("gsm8k", "math500"):
        expected = 2 * sum(1 for b, _ in too_long if b == bench)
        assert summary["benchmarks"][bench]["prompt_too_long"] == expected
    assert "prompt too long" in (out / "summary.md").read_text()
