"""Slurm preemption on the local cluster: ``sbatch examples/run_trapo_32b.sh`` (CPU stand-ins, as
in test_launch_slurm), then SIGUSR1 to the batch script — what ``#SBATCH --signal=B:USR1@300``
sends before a time limit. The trainer finishes its step, saves, exits 75; the launcher requeues
the job; the requeued job resumes — and the run equals the same job run without interruption
(every step's loss, gradient norm, reward and sampled tokens' lengths; the logprob ratio only to
rounding, see ROUNDING_ONLY)."""
import json
import os
import subprocess
import sys
import time

import pytest
from launch_helpers import ROOT, leftovers, metrics, write_config
from slurm_cluster import require_slurm

ITERS = 4
COMPARED = ("loss", "rollout/reward_unguided", "rollout/samples", "rollout/length_unguided")
# max exp(lp - old_lp) over sampled tokens is 1 plus float rounding between two forward passes; the
# rounding differs with the thread count a Slurm step gets (CI saw 1+1.5e-5 against 1+1.2e-6), so
# it is compared as "1 to rounding" in both runs, not digit for digit.
ROUNDING_ONLY = {"pg/ratio_max": 1e-3}
# the gradient norm of step 1 — before any interruption — differed between two runs of this test
# by 1.2e-5 relative (1.6337310 vs 1.6337108; the next run's uninterrupted reference alone
# moved by 8e-6; a later step's norm of 9.26e-8 by 1.2e-11): rounding that varies from run to
# run, source not found yet; compared to 1e-4 relative or 1e-9 absolute
ROUNDING_REL = {"grad_norm": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require_slurm()


def job_info(job_id: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def test_usr1_saves_requeues_and_the_resumed_run_equals_an_uninterrupted_one(files, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    # the uninterrupted reference: the same job through the launcher, on this machine
    ref_dir, ref_cfg = tmp_path / "ref", tmp_path / "ref.yaml"
    write_config(ref_cfg, files, ref_dir, iters=ITERS, servers=1, save=tmp_path / "ref_ckpt")
    ref = subprocess.run([sys.executable, "-m", "megatron_trapo.cli", "launch", "--config",
                          str(ref_cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = metrics(ref_dir)
    assert [r["step"] for r in expected] == list(range(1, ITERS + 1))

    run_dir, cfg, ckpt = tmp_path / "runs", tmp_path / "job.yaml", tmp_path / "ckpt"
    write_config(cfg, files, run_dir, iters=ITERS, servers=1, save=ckpt)
    out = tmp_path / "slurm.out"
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gres=none", "--time=00:20:00",
                          f"--output={out}", "examples/run_trapo_32b.sh"], cwd=ROOT,
                         env=dict(env, TRAPO_CONFIG=str(cfg)), capture_output=True, text=True,
                         check=True)
    job_id = sub.stdout.strip().split(";")[0]
    signalled = False
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            # the trainer has built its model and opened its log (step 1 at the latest): preempt.
            # Waiting for a logged step instead raced the run on a fast machine: the signal
            # could land in the last step, which finishes the run instead.
            if not signalled and (run_dir / "metrics.jsonl").exists():
                subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
                signalled = True
            info = job_info(job_id)
            if signalled and (not info or info.get("JobState") in ("COMPLETED", "FAILED",
                                                                    "CANCELLED", "TIMEOUT")):
                break
            time.sleep(1)
        else:
            pytest.fail(f"job {job_id} still running: {job_info(job_id)}; "
                        f"{out.read_text()[-3000:] if out.exists() else ''}")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log = out.read_text()
    assert info.get("JobState", "COMPLETED") == "COMPLETED", log[-4000:]
    assert info.get("Restarts", "1") == "1", info
    record = json.loads((ckpt / "preempted.json").read_text())
    stopped = record["step"]
    assert record["saved"] and record["reason"] == "stop file " + str(ckpt / "STOP")
    assert 1 <= stopped < ITERS, record
    assert f"launch: the trainer stopped at step {stopped}" in log
    assert "launch: done (exit code 75)" in log and f"requeueing Slurm job {job_id}" in log
    assert f"Slurm restart 1 of job {job_id}: resuming" in log
    assert not (ckpt / "STOP").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))  # no step lost or repeated
    for got, want in zip(rows, expected):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
        for key, rel in ROUNDING_REL.items():
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-9), (got["step"], key)
        for key, tol in ROUNDING_ONLY.items():
            assert abs(got[key] - want[key]) < tol, (got["step"], key, got[key], want[key])
    state = json.loads((run_dir / "launch" / "job.json").read_text())
    assert state["state"] == "done" and state["exit_code"] == 0
    assert leftovers(str(run_dir)) == [] and leftovers(str(cfg)) == []
