"""Launch a test worker under torchrun (gloo on CPU) and return the JSON it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(script: str, nproc: int, tmp_path: Path, timeout: int = 600) -> dict:
    out = tmp_path / "results.json"
    env = dict(os.environ, TRAPO_TEST_OUT=str(out), TRAPO_TEST_CKPT=str(tmp_path / "ckpt"),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKERS / script)]
    proc = subprocess.run(cmd, env=env, cwd=WORKERS, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())
