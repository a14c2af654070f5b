"""Launch a test worker under torchrun (gloo on CPU) and return the JSON it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from workers.results import from_json

from megatron_trapo.platform.distributed import free_port  # noqa: F401 (used by tests)

WORKERS = Path(__file__).parent / "workers"


def run_worker(script: str, nproc: int, tmp_path: Path, timeout: int = 600,
               env: dict | None = None, result=None):
    """The worker's results: an instance of ``result`` (a dataclass of workers/results.py, read
    strictly) when given, else the plain JSON."""
    out = tmp_path / "results.json"
    env = dict(os.environ, TRAPO_TEST_OUT=str(out), TRAPO_TEST_CKPT=str(tmp_path / "ckpt"),
               PYTHONWARNINGS="ignore", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKERS / script)]
    proc = subprocess.run(cmd, env=env, cwd=WORKERS, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    return from_json(result, out.read_text()) if result is not None else json.loads(out.read_text())


def run_tool(*args: str, timeout: int = 900) -> str:
    """Run a tools/ script as a user would; returns its stdout, fails with its output."""
    tool = Path(__file__).resolve().parents[2] / "tools" / args[0]
    proc = subprocess.run([sys.executable, str(tool), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return proc.stdout
