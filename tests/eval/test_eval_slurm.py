"""``megatron-trapo eval --slurm`` on a real Slurm cluster (scripts/ci/start_local_slurm.sh;
CI starts it and sets MEGATRON_TRAPO_REQUIRE_SLURM=1, so that these tests cannot skip there)."""
import json
import subprocess

import pytest
from eval_helpers import EVAL_ARGS, cli, rows
from slurm_cluster import require_slurm

SLURM_ARGS = ["--slurm", "--wait", "--wait-timeout", "480", "slurm.cpus_per_task=1",
              "slurm.max_concurrent=4", "slurm.poll_interval_s=0.5", "slurm.time=00:10:00"]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require_slurm()


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         check=True).stdout
    return out.split("JobState=")[1].split()[0] + " " + out.split("Reason=")[1].split()[0]


def test_slurm_array_matches_the_local_run(tiny_model, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS, *SLURM_ARGS)
    jobs = json.loads(proc.stdout.splitlines()[0])
    assert set(jobs) == {"out_dir", "array", "aggregate"}
    array = (out / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=1" in array and "eval-shard" in array
    assert len(list((out / "slurm" / "logs").glob(f"shard_*_{jobs['array']}.out"))) == 8
    assert job_state(jobs["aggregate"]).startswith("COMPLETED")
    # identical samples, texts and verdicts: the seeds are fixed per (problem, sample)
    assert rows(out) == rows(reference_run)
    ours = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference_run / "summary.json").read_text())
    assert ours["benchmarks"] == ref["benchmarks"] and ours["average"] == ref["average"]
    assert (out / "summary.md").read_text() == (reference_run / "summary.md").read_text()


def test_a_failed_shard_cancels_aggregation_and_resubmitting_it_completes(
        tiny_model, reference_run, tmp_path):
    """Here every array task also launches its own rollout server (our SGLang-protocol server
    behind sglang-router): the per-task server launch a GPU cluster does with SGLang."""
    out, allow = tmp_path / "out", tmp_path / "allow_shard_3"
    # Shard 3 fails (exit 3 in the task's setup lines) until the file `allow` exists.
    fail = (f"if [ \"\\${{SLURM_ARRAY_TASK_ID:-}}\" = 3 ] && [ ! -f {allow} ]; then "
            "echo injected failure; exit 3; fi")
    proc = cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS,
               *SLURM_ARGS, f"slurm.setup=['{fail}']", "rollout.engine=sglang",
               "rollout.server_impl=hf", check=False)
    first = json.loads(proc.stdout.splitlines()[0])
    assert proc.returncode == 2
    assert "1 of 8 shards have no results: 3 (00003_gsm8k_p2-3_s1-2)" in proc.stderr
    assert job_state(first["aggregate"]) == "CANCELLED DependencyNeverSatisfied"
    assert not (out / "summary.json").exists()
    proc = cli("eval-aggregate", str(out), check=False)  # refuses, naming the shard
    assert proc.returncode == 2 and "3 (00003_gsm8k_p2-3_s1-2)" in proc.stderr

    allow.touch()
    proc = cli("eval-resubmit", str(out), "--wait", "--wait-timeout", "300")
    second = json.loads(proc.stdout.splitlines()[0])
    submitted = [json.loads(line) for line in (out / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert submitted[-1]["shards"] == [3] and submitted[-1]["array"] == second["array"]
    assert len(list((out / "slurm" / "logs").glob(f"shard_*_{second['array']}.out"))) == 1
    assert rows(out) == rows(reference_run)
    log = next((out / "slurm" / "logs").glob(f"shard_3_{second['array']}.out")).read_text()
    assert "rollout engine sglang: servers ['http://127.0.0.1:" in log
    assert "launched by this task, router http://127.0.0.1:" in log
    proc = cli("eval-resubmit", str(out), check=False)
    assert proc.returncode == 2 and "nothing to resubmit" in proc.stderr


def test_a_megatron_checkpoint_is_converted_by_a_first_job(mcore_checkpoint, reference_run,
                                                            tmp_path):
    out = tmp_path / "out"
    proc = cli("eval", f"load={mcore_checkpoint}", f"output_dir={out}", *EVAL_ARGS, *SLURM_ARGS)
    jobs = json.loads(proc.stdout.splitlines()[0])
    assert set(jobs) == {"out_dir", "convert", "array", "aggregate"}
    # array tasks refuse to start without output_dir/hf_model: their success shows the order
    assert job_state(jobs["convert"]).startswith("COMPLETED")
    assert job_state(jobs["aggregate"]).startswith("COMPLETED")
    assert (out / "hf_model" / "config.json").is_file()
    assert rows(out) == rows(reference_run)


def test_a_task_no_node_can_hold_is_refused_at_submit(tiny_model, tmp_path):
    """Probe: the default slurm.cpus_per_task=8 on this cluster's 4-CPU node used to pend
    forever (Reason=PartitionConfig), and --wait with it."""
    out = tmp_path / "out"
    args = [a for a in SLURM_ARGS if not a.startswith("slurm.cpus_per_task")]
    proc = cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS, *args,
               check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "slurm.cpus_per_task=8 (its nodes have at most" in proc.stderr
    assert "Reason=PartitionConfig" in proc.stderr
    assert not (out / "slurm" / "jobs.jsonl").exists()  # nothing was submitted


def test_wait_fails_with_the_reason_when_jobs_can_never_start(tiny_model, tmp_path):
    """A request the submit check cannot see (here an extra sbatch flag) pends with a reason
    that cannot clear: --wait says so within seconds and cancels the jobs."""
    out = tmp_path / "out"
    proc = cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS, *SLURM_ARGS,
               "slurm.extra_sbatch_args=['--cpus-per-task=64']", check=False, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "pending for a reason that cannot clear" in proc.stderr
    assert "(PartitionConfig)" in proc.stderr or "(PartitionNodeLimit)" in proc.stderr, proc.stderr
    jobs = json.loads(proc.stdout.splitlines()[0])
    queued = subprocess.run(["squeue", "-h", "-j", f"{jobs['array']},{jobs['aggregate']}"],
                            capture_output=True, text=True)
    assert queued.stdout.strip() == ""  # cancelled, not left pending
