"""benchmarks/rescore_demo.py: its summary against numbers worked by hand, and a missing run
named instead of a mean over fewer seeds."""
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "rescore_demo.py"
_spec = importlib.util.spec_from_file_location("rescore_demo", _PATH)
rescore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rescore)


def _acc(overall, one):
    return {"eval/accuracy": overall, "eval/accuracy/synthetic-1step": one}


def test_summary_means_stds_and_gain_in_seed_stds():
    table = rescore.summarize({"base": [_acc(0.40, 0.8)],
                               "grpo": [_acc(0.41, 0.8), _acc(0.43, 0.9), _acc(0.42, 1.0)]})
    grpo = table["grpo"]
    # overall: mean 0.42, sample std 0.01; gain 0.02 over the base = 2 seed stds
    assert grpo["mean_std"]["eval/accuracy"] == pytest.approx((0.42, 0.01))
    assert grpo["mean_std"]["eval/accuracy/synthetic-1step"] == pytest.approx((0.9, 0.1))
    assert grpo["gain"] == pytest.approx(0.02) and grpo["gain_in_stds"] == pytest.approx(2.0)
    assert grpo["seeds"] == 3 and table["base"]["gain"] == 0.0


def test_a_run_that_did_not_finish_is_named(tmp_path):
    for name in ("base", "grpo_seed1"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "final.json").write_text(json.dumps({}))
    found = rescore.checkpoints(tmp_path, ["grpo"], 1)
    assert found == {"base": [tmp_path / "runs/base/ckpt"],
                     "grpo": [tmp_path / "runs/grpo_seed1/ckpt"]}
    with pytest.raises(SystemExit, match="--methods grpo: no finished run .*grpo_seed2"):
        rescore.checkpoints(tmp_path, ["grpo"], 2)
