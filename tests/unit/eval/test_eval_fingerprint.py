"""An evaluation folder is resumed only over results of the same weights, checkpoint iteration
and benchmark files (the robustness probes 6g, 6h, 6i gave stale results silently)."""
import json

import pytest

from megatron_trapo.config import ConfigError, EvalConfig, load_config
from megatron_trapo.eval import fingerprint


def fake_checkpoint(root, iterations):
    for it in iterations:
        d = root / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"w" * (10 + it))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iterations[-1]))


def some_results(out):
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards" / "math500_p0-2_s0-1.jsonl").write_text('{"x": 1}\n')
    (out / "summary.md").write_text("old")


def test_a_checkpoint_that_training_advanced_is_not_resumed(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    fake_checkpoint(ckpt, [4])
    cfg = load_config(EvalConfig, None, [f"load={ckpt}", "benchmarks=[math500]"])
    out.mkdir()
    first = fingerprint.check(out, cfg, False, out / "hf_model")
    assert first["model"]["iteration"] == 4  # `latest` resolved and recorded
    some_results(out)
    fingerprint.check(out, cfg, False, out / "hf_model")  # unchanged: resumed
    fake_checkpoint(ckpt, [8])  # training went on
    with pytest.raises(ConfigError, match=r"holds results of something else: checkpoint "
                                          r"iteration 4 → 8.*--force"):
        fingerprint.check(out, cfg, False, out / "hf_model")
    with pytest.raises(ConfigError, match=r"checkpoint iteration 4 → 8; .* since this "
                                          r"evaluation was planned"):
        fingerprint.verify(out, cfg)  # what every Slurm task checks first
    (out / "hf_model").mkdir()
    fingerprint.check(out, cfg, True, out / "hf_model")  # --force: old results discarded
    assert not (out / "shards").exists() and not (out / "summary.md").exists()
    assert not (out / "hf_model").exists()  # converted from iteration 4: converted again
    assert json.loads((out / "fingerprint.json").read_text())["model"]["iteration"] == 8


def test_weights_copied_over_the_same_path_are_noticed(tmp_path):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model-00001-of-00001.safetensors").write_bytes(b"a" * 100)
    cfg = load_config(EvalConfig, None, [f"model_path={model}", "benchmarks=[gsm8k]"])
    out.mkdir()
    fingerprint.check(out, cfg, False, out / "hf_model")
    some_results(out)
    (model / "model-00001-of-00001.safetensors").write_bytes(b"b" * 101)
    with pytest.raises(ConfigError, match=r"model files changed "
                                          r"\(model-00001-of-00001.safetensors\)"):
        fingerprint.check(out, cfg, False, out / "hf_model")


def test_a_rewritten_benchmark_file_is_noticed(tmp_path):
    from megatron_trapo.eval import registry

    bench = tmp_path / "mine.jsonl"
    bench.write_text('{"problem": "1+1", "answer": "2"}\n')
    registry.register("mine_fp", bench)
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(EvalConfig, None, [f"model_path={model}", "benchmarks=[mine_fp]"])
    out.mkdir()
    fingerprint.check(out, cfg, False, out / "hf_model")
    some_results(out)
    bench.write_text('{"problem": "2+2", "answer": "4"}\n')
    with pytest.raises(ConfigError, match=r"benchmark mine_fp's file changed"):
        fingerprint.check(out, cfg, False, out / "hf_model")


def test_extra_benchmarks_are_evaluated_without_being_listed(tmp_path):
    from megatron_trapo.eval.plan import prepare

    bench = tmp_path / "mine.jsonl"
    bench.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(EvalConfig, None, [
        f"model_path={model}", "benchmarks=[gsm8k]", "limit=3", f"output_dir={tmp_path / 'out'}",
        f"extra_benchmarks=[{{name: mine_extra, path: {bench}, problem_field: q, answer_field: a}}]"])
    plan = prepare(cfg)
    assert plan.counts["mine_extra"][0] == 2 and plan.counts["gsm8k"][0] == 3
