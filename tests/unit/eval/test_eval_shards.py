"""Evaluation plumbing without a model: shard planning and seeds, atomic/resumable files, the
aggregator's refusal of incomplete results, the summary numbers, sbatch scripts."""
import json

import pytest

from megatron_trapo.config import ConfigError, EvalConfig, SlurmConfig, load_config, save_yaml
from megatron_trapo.eval import runner
from megatron_trapo.eval.shards import (plan_shards, read_jsonl, sample_seed, shard_path,
                                        write_atomic, write_shard)
from megatron_trapo.eval.slurm import array_spec, script
from megatron_trapo.eval.summary import IncompleteResults, aggregate, markdown, summarize_rows


def test_shards_cover_every_sample_once():
    counts = {"a": (5, 4), "b": (3, 1)}
    for pps, sps in [(2, 0), (2, 3), (1, 1), (10, 10)]:
        shards = plan_shards(counts, pps, sps)
        assert [s.index for s in shards] == list(range(len(shards)))
        keys = [(s.benchmark, p, j) for s in shards for p, j in s.keys()]
        assert len(keys) == len(set(keys)) == 5 * 4 + 3 * 1
    assert len(plan_shards(counts, 2, 3)) == 3 * 2 + 2 * 1  # a: 3 problem ranges × 2 sample ranges


def test_sample_seeds_do_not_depend_on_sharding():
    base = sample_seed(7, "aime24", 3)
    assert base == sample_seed(7, "aime24", 3)
    assert len({sample_seed(7, "aime24", p) for p in range(30)}) == 30
    assert sample_seed(7, "aime24", 3) != sample_seed(8, "aime24", 3)
    assert sample_seed(7, "aime24", 3) != sample_seed(7, "aime25", 3)
    assert base % 4096 == 0 and base + 4095 < 2**62  # room for k <= 4096 sample offsets


def test_jsonl_drops_a_cut_last_line_but_not_corruption(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match="unreadable line 2"):
        read_jsonl(path)
    write_atomic(tmp_path / "x" / "y.txt", "whole")
    assert (tmp_path / "x" / "y.txt").read_text() == "whole"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.txt"]  # no temp file left


def _row(bench, p, s, correct, grader="math_verify"):
    return {"benchmark": bench, "problem_id": p, "sample_index": s, "correct": correct,
            "grader": grader, "finish_reason": "stop", "num_tokens": 10, "text": "",
            "answer": "1", "extracted": "1", "seed": 0}


def test_summary_numbers_by_hand():
    rows = [_row("a", 0, s, s < 1) for s in range(4)] + [_row("a", 1, s, True) for s in range(4)]
    rows += [_row("b", 0, 0, True, "prm800k"), _row("b", 1, 0, False, "both")]
    summary = summarize_rows(rows, ["a", "b"])
    a, b = summary["benchmarks"]["a"], summary["benchmarks"]["b"]
    assert a["score"] == pytest.approx((1 / 4 + 1) / 2)  # avg@4
    assert a["pass@2"] == pytest.approx((0.5 + 1) / 2)  # problem 0: 1 - C(3,2)/C(4,2)
    assert a["pass@4"] == 1.0 and a["k"] == 4
    assert b["score"] == 0.5 and b["graders"] == {"both": 1, "prm800k": 1}
    assert summary["average"]["score"] == pytest.approx((0.625 + 0.5) / 2)
    assert set(summary["average"]) == {"score", "pass@1"}  # only the k every benchmark has
    table = markdown(summary)
    assert "| a | 2 | 4 | 62.5 | 62.5 | 75.0 | 100.0 | 0 |" in table
    assert "| **average** |  |  | 56.2 | 56.2 |" in table


def _plan(tmp_path, **over):
    cfg = load_config(EvalConfig, None, [f"output_dir={tmp_path / 'out'}", "benchmarks=[amc23,gsm8k]",
                                         "limit=3", "k=2", "problems_per_shard=2"] +
                      [f"{k}={v}" for k, v in over.items()])
    return runner.prepare(cfg)


def test_aggregator_names_missing_shards_then_summarises(tmp_path):
    plan = _plan(tmp_path)
    assert [s.name for s in plan.shards] == ["00000_amc23_p0-2_s0-2", "00001_amc23_p2-3_s0-2",
                                             "00002_gsm8k_p0-2_s0-2", "00003_gsm8k_p2-3_s0-2"]
    for shard in plan.shards[:3]:
        write_shard(plan.out_dir, shard, [_row(shard.benchmark, p, s, p == 0)
                                          for p, s in reversed(shard.keys())])
    with pytest.raises(IncompleteResults, match=r"1 of 4 shards .*3 \(00003_gsm8k_p2-3_s0-2\)"):
        aggregate(plan.out_dir)
    assert not (plan.out_dir / "summary.json").exists()
    last = plan.shards[3]
    shard_path(plan.out_dir, last).write_text(json.dumps(_row("gsm8k", 2, 0, True)) + "\n")
    with pytest.raises(IncompleteResults, match="does not hold exactly its samples"):
        aggregate(plan.out_dir)  # a shard file with samples missing is not accepted either
    write_shard(plan.out_dir, last, [_row("gsm8k", 2, s, False) for s in range(2)])
    summary = aggregate(plan.out_dir)
    assert summary["benchmarks"]["amc23"]["score"] == pytest.approx(1 / 3)
    assert json.loads((plan.out_dir / "summary.json").read_text())["average"] == summary["average"]
    merged = read_jsonl(plan.out_dir / "samples.jsonl")
    assert [(r["benchmark"], r["problem_id"], r["sample_index"]) for r in merged][:3] == \
        [("amc23", 0, 0), ("amc23", 0, 1), ("amc23", 1, 0)]


def test_a_folder_is_resumed_only_with_the_same_settings(tmp_path):
    _plan(tmp_path)
    _plan(tmp_path, batch_size=8)  # batch size does not change results
    with pytest.raises(ConfigError, match=r"other \['k', 'temperature'\]"):
        _plan(tmp_path, k=4, temperature=1.0)
    with pytest.raises(ConfigError, match="not an evaluation folder"):
        runner.load_plan(tmp_path / "nothing")


def test_config_round_trip_keeps_shell_lines(tmp_path):
    cfg = load_config(EvalConfig, None, ["slurm.setup=['echo \\${SLURM_ARRAY_TASK_ID:-} $HOME']"])
    assert cfg.slurm.setup == ["echo ${SLURM_ARRAY_TASK_ID:-} $HOME"]
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(EvalConfig, tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="prompt_template"):
        load_config(EvalConfig, None, ["prompt_template=Solve it"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(EvalConfig, None, ['slurm.setup=["a\\$"]'])


def test_array_spec_and_sbatch_script(tmp_path):
    assert array_spec(range(8), 4) == "0-7%4"
    assert array_spec([7, 1, 2, 3, 9, 10], 2) == "1-3,7,9-10%2"
    assert array_spec([5], 1) == "5%1"
    cfg = SlurmConfig(partition="h100", account="llm", time="01:00:00", gpus_per_task=8,
                      setup=["module load cuda"], extra_sbatch_args=["--exclusive"])
    text = script(cfg, "trapo-eval", tmp_path / "log_%a.out", "exec python -m x", cfg.gpus_per_task)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in ["--partition=h100", "--account=llm", "--time=01:00:00", "--gres=gpu:8",
                "--exclusive", "--job-name=trapo-eval", f"--output={tmp_path / 'log_%a.out'}"]:
        assert f"#SBATCH {opt}" in lines
    assert lines.index("module load cuda") < lines.index("exec python -m x") == len(lines) - 1
    assert not any("qos" in line or "--mem" in line for line in lines)
    with pytest.raises(ConfigError, match="slurm.max_concurrent"):
        SlurmConfig(max_concurrent=0)
    boxed = SlurmConfig(container_image="nvcr.io#trapo:rollout", container_mounts="/lustre:/lustre")
    last = script(boxed, "e", tmp_path / "l.out", "exec python -m x", 0).splitlines()[-1]
    assert last.startswith("exec srun --ntasks=1 --container-image='nvcr.io#trapo:rollout' ")
    assert "--container-mounts=/lustre:/lustre" in last and last.endswith(" python -m x")


def test_sinfo_fields_and_reasons_that_never_clear():
    from megatron_trapo.eval.slurm import _gpus, _megabytes, never_clears

    assert _gpus("gpu:8") == 8 and _gpus("gpu:h100:4(S:0-1),nic:2") == 4 and _gpus("(null)") == 0
    assert _gpus("gpu:a100:2,gpu:v100:1") == 3
    assert _megabytes("200G") == 200 * 1024 and _megabytes("64000") == 64000
    assert _megabytes("1T") == 1024 ** 2 and _megabytes("lots") is None
    assert never_clears("PartitionConfig") and never_clears("QOSMaxCpuPerJobLimit")
    assert not never_clears("Resources") and not never_clears("Priority")
    assert not never_clears("Dependency") and not never_clears("ReqNodeNotAvail")
