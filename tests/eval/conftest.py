"""Fixtures of the evaluation tests: a tiny Qwen2 (random weights, a locally trained tokenizer
with a chat template) and the reference local run that the Slurm runs are compared with."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollout_models import tiny_qwen2  # noqa: E402

# Two benchmarks, three problems each, k=2, short answers; 2 problems × 1 sample per shard.
EVAL_ARGS = ["benchmarks=[gsm8k,math500]", "limit=3", "k=2", "max_new_tokens=24",
             "problems_per_shard=2", "samples_per_shard=1", "seed=5", "grader_workers=1"]


def cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``megatron-trapo ARGS`` as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "megatron_trapo.cli", *args], text=True,
                          capture_output=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and proc.returncode != 0:
        raise AssertionError(f"megatron-trapo {' '.join(args)} failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return proc


def rows(out_dir: Path) -> list:
    with open(out_dir / "samples.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("eval_model") / "model", seed=3, max_positions=2048)


@pytest.fixture(scope="session")
def mcore_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """The tiny model converted to a Megatron checkpoint (tools/convert_hf_to_mcore.py)."""
    out = tmp_path_factory.mktemp("eval_mcore") / "ckpt"
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_hf_to_mcore.py"
    subprocess.run([sys.executable, str(tool), "--hf-dir", str(tiny_model), "--out-dir",
                    str(out)], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def reference_run(tiny_model, tmp_path_factory) -> Path:
    """The same evaluation run locally (no Slurm), all shards in one process."""
    out = tmp_path_factory.mktemp("eval_local") / "out"
    cli("eval", f"model_path={tiny_model}", f"output_dir={out}", *EVAL_ARGS)
    return out
