"""Fixtures of the evaluation tests: a tiny Qwen2 (a locally trained tokenizer, then taught
to give boxed answers) and the reference local run that the Slurm runs are compared with."""
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import EVAL_ARGS, cli, teach_answers

from rollout_models import tiny_qwen2


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tiny_qwen2(tmp_path_factory.mktemp("eval_model") / "model", seed=3, max_positions=2048)
    teach_answers(path)
    return path


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
