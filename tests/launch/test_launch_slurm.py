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
from pathlib import Path

import psutil
import pytest
from rollout_models import tiny_qwen2
from slurm_cluster import require_slurm

from megatron_trapo.platform.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
ITERS = 4


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require_slurm()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from megatron_trapo.data.records import save_records
    from megatron_trapo.data.synthetic import make_split

    tmp = tmp_path_factory.mktemp("launch")
    hf = tiny_qwen2(tmp / "hf", seed=2, max_positions=512)
    mc = tmp / "mc"
    subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_mcore.py"), "--hf-dir",
                    str(hf), "--out-dir", str(mc)], check=True, capture_output=True, timeout=600)
    save_records(make_split(32, 0, [1, 2], "train"), tmp / "train.jsonl")
    return {"hf": hf, "mc": mc, "train": tmp / "train.jsonl"}


def write_config(path: Path, files, run_dir: Path) -> None:
    port = free_port()
    path.write_text(f"""
load: {files['mc']}
rollout:
  engine: sglang
  server_impl: embedded
  model_path: {files['hf']}
  tokenizer_path: {files['hf']}
  weight_sync: distributed
  startup_timeout_s: 300
  request_timeout_s: 120
launch:
  trainer_nodes: 1
  gpus_per_node: 4
  trainer_gpus_per_node: 2
  server_tp_size: 1
  server_port: {port}
  master_port: {free_port()}
  slurm_gres: false
train_data: {files['train']}
prompts_per_step: 2
train_iters: {ITERS}
recompute_old_logprobs: false
loss:
  max_response_length: 24
optimizer:
  lr: 1.0e-3
log_dir: {run_dir}
""")


def metrics(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_pid(run_dir: Path, name: str) -> int:
    for line in (run_dir / "launch" / "agent-{}.log".format(os.uname().nodename)).read_text() \
            .splitlines():
        if f" {name} pid " in line:
            return int(line.split(" pid ")[1].split()[0])
    raise AssertionError(f"{name} not in the agent log")


def leftovers(marker: str):
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "pytest" not in cmd:
            found.append(cmd[:200])
    return found


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
    assert proc.returncode == 0, f"{stderr}\n{log[-4000:]}"
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
    assert "launch: 2 server(s) healthy" in log and "servers stopped" in log
    # nothing left: the job, its steps, the servers, the agent, the trainer
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    assert queued.stdout.strip() == ""
    assert leftovers(str(run_dir)) == [] and leftovers(str(cfg)) == []
    assert leftovers(str(files["hf"])) == []  # the servers
