"""Fixtures of the launch tests: a tiny Qwen2 (HF and Megatron) and training problems."""
import subprocess
import sys
from pathlib import Path

import pytest
from rollout_models import tiny_qwen2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A tiny Qwen2 (HF and converted to Megatron) and 32 training problems."""
    from megatron_trapo.data.records import save_records
    from megatron_trapo.data.synthetic import make_split

    tmp = tmp_path_factory.mktemp("launch")
    hf = tiny_qwen2(tmp / "hf", seed=2, max_positions=512)
    mc = tmp / "mc"
    subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_mcore.py"), "--hf-dir",
                    str(hf), "--out-dir", str(mc)], check=True, capture_output=True, timeout=600)
    save_records(make_split(32, 0, [1, 2], "train"), tmp / "train.jsonl")
    return {"hf": hf, "mc": mc, "train": tmp / "train.jsonl"}
