"""What the launch tests on the local Slurm cluster share: the job config, its metrics, the
processes it leaves behind."""
import json
import os
from pathlib import Path
from typing import Optional

import psutil

from megatron_trapo.platform.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
ITERS = 4


def write_config(path: Path, files, run_dir: Path, iters: int = ITERS, servers: int = 2,
                 save: Optional[Path] = None) -> None:
    """``servers`` rollout servers beside a 2-process trainer on the one node."""
    checkpoint = f"checkpoint:\n  save: {save}\n" if save else ""
    path.write_text(f"""
load: {files['mc']}
rollout:
  engine: sglang
  server_impl: hf
  model_path: {files['hf']}
  tokenizer_path: {files['hf']}
  weight_sync: distributed
  startup_timeout_s: 300
  request_timeout_s: 120
launch:
  trainer_nodes: 1
  gpus_per_node: {2 + servers}
  trainer_gpus_per_node: 2
  server_tp_size: 1
  server_port: {free_port()}
  master_port: {free_port()}
  slurm_gres: false
train_data: {files['train']}
prompts_per_step: 2
train_iters: {iters}
batching:
  recompute_old_logprobs: false
loss:
  max_response_length: 24
optimizer:
  lr: 1.0e-3
log_dir: {run_dir}
{checkpoint}""")


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
