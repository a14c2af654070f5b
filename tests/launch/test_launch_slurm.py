"""``sbatch examples/run_trapo_32b.sh`` end to end on the local Slurm cluster, with CPU
stand-ins: our protocol server for SGLang, gloo for NCCL, a tiny Qwen2 for 32B. The script's
launcher places two servers and a 2-process trainer on the node (launch.trainer_gpus_per_node
of 4 "GPUs"), starts the servers as a job step, runs the trainer as another, syncs weights to
every server after every step; one server is killed mid-run and the run finishes on the other;
nothing is left running afterwards."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from launch_helpers import ITERS, ROOT, leftovers, metrics, server_pid, write_config
from slurm_cluster import require_slurm


def routers_since(t0: float) -> list:
    """sglang-router processes started after ``t0`` that are still running (the router
    renames itself "sglang::router", so no path in its command line finds it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if "router" in cmd and "sglang" in cmd and p.info["create_time"] >= t0 - 1:
            found.append(f"{p.info['pid']} {cmd[:120]}")
    return found


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require_slurm()


def test_sbatch_runs_servers_and_trainer_and_survives_a_dead_server(files, tmp_path):
    run_dir = tmp_path / "runs"
    cfg = tmp_path / "job.yaml"
    write_config(cfg, files, run_dir)
    env = dict(os.environ, PYTHON=sys.executable, TRAPO_CONFIG=str(cfg), PYTHONWARNINGS="ignore")
    out = tmp_path / "slurm.out"
    proc = subprocess.Popen(
        ["sbatch", "--parsable", "--wait", "--nodes=1", "--gres=none", "--time=00:20:00",
         f"--output={out}", "examples/run_trapo_32b.sh"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    started = time.time()
    deadline = time.time() + 840
    while proc.poll() is None and time.time() < deadline:
        rows = metrics(run_dir)
        if killed is None and len(rows) >= 1:  # step 1 done on both servers: kill one
            killed = server_pid(run_dir, "server1")
            os.killpg(killed, signal.SIGKILL)
        time.sleep(1)
    if proc.poll() is None:
        proc.kill()
        pytest.fail(f"sbatch --wait still running; {out}:\n{out.read_text()[-3000:]}")
    stdout, stderr = proc.communicate()
    log = out.read_text() if out.exists() else ""
    # rank 0's traceback first: the tail is mostly the other ranks' reaction to it
    rank0 = "\n".join(line for line in log.splitlines() if line.startswith("[rank0]"))
    assert proc.returncode == 0, f"{stderr}\n{rank0[-4000:]}\n{log[-4000:]}"
    job_id = stdout.strip().split(";")[0]
    assert killed is not None, log[-3000:]
    state = json.loads((run_dir / "launch" / "job.json").read_text())
    assert state["state"] == "done" and state["exit_code"] == 0
    assert len(state["server_urls"]) == 2
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))
    # rollout logprobs (the engine's) == the trainer's for every token of every step, on both
    # servers and after the kill: each sync reached every live server
    assert all(abs(r["pg/ratio_max"] - 1) < 1e-3 for r in rows), [r["pg/ratio_max"] for r in rows]
    assert rows[0]["sync/servers"] == 2 and rows[-1]["sync/servers"] == 1
    assert rows[-1]["sync/rebuilds"] == 1  # the weight group formed again without the dead one
    # every step had all of its samples (2 prompts x 8), none lost with the dead server, none
    # duplicated by the retries; the run logged the death and counts it
    assert [r["rollout/samples"] for r in rows] == [16.0] * ITERS
    assert rows[0]["rollout/servers_dead"] == 0 and rows[0]["rollout/servers_live"] == 2
    assert rows[-1]["rollout/servers_dead"] == 1 and rows[-1]["rollout/servers_live"] == 1
    assert "is dead; dropped" in log
    assert "launch: 2 server(s) healthy" in log and "servers stopped" in log
    # nothing left: the job, its steps, the servers, the agent, the trainer
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    assert queued.stdout.strip() == ""
    assert leftovers(str(run_dir)) == [] and leftovers(str(cfg)) == []
    assert leftovers(str(files["hf"])) == []  # the servers
    assert routers_since(started) == []  # the trainer's sglang-router (renamed, own session)
