"""The README's main job end to end: `megatron-trapo smoke` under torchrun at TP=2, with
checkpoints, metrics and an exact --resume (the resumed run repeats the uninterrupted one)."""
import json
import os
import subprocess
import sys

import pytest

from launch import free_port


def smoke(tmp, name, *overrides, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "megatron_trapo.cli", "smoke",
           "parallel.tensor_model_parallel_size=2", f"checkpoint.save={tmp}/{name}/ckpt",
           f"log_dir={tmp}/{name}/runs", "checkpoint.save_interval=4",
           "optimizer.lr_decay_iters=12", *overrides]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(f"{tmp}/{name}/runs/metrics.jsonl") as f:
        return [json.loads(l) for l in f], proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    full, out_full = smoke(tmp, "full", "train_iters=12")
    part, _ = smoke(tmp, "split", "train_iters=4")
    resumed, out_resumed = smoke(tmp, "split", "train_iters=12", resume=True)
    return {"tmp": tmp, "full": full, "part": part, "resumed": resumed,
            "out_full": out_full, "out_resumed": out_resumed}


def test_loss_falls_and_metrics_are_logged(runs):
    full = runs["full"]
    assert [r["step"] for r in full] == list(range(1, 13))
    assert full[-1]["loss"] < full[0]["loss"] - 0.5
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in full)
    assert "layout: world=2 tp=2 pp=1" in runs["out_full"]


def test_resume_continues_exactly(runs):
    resumed = runs["resumed"][len(runs["part"]):]  # same metrics file, appended
    assert [r["step"] for r in resumed] == list(range(5, 13))
    for a, b in zip(runs["full"][4:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert "started at iteration 4" in runs["out_resumed"]


def test_checkpoints_written_atomically(runs):
    ckpt = runs["tmp"] / "full" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000008",
                                                          "iter_0000012"]
    assert not list(ckpt.glob(".tmp_*"))
    meta = json.loads((ckpt / "iter_0000012" / "trapo_meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["config"]["model"]["num_layers"] == 4


@pytest.mark.parametrize("recompute", [
    ["model.recompute_granularity=full", "model.recompute_method=uniform",
     "model.recompute_num_layers=1"],
    ["model.recompute_granularity=selective"]], ids=["full", "selective"])
def test_activation_recompute_on_cpu_trains_exactly_as_without(runs, tmp_path, recompute):
    """megatron re-runs each layer's forward inside autograd's backward, where the CPU layer's
    device rewriting was not active (it was refused on CPU: ``device="cuda"`` in the re-run
    forward); now the same 4 steps give the same losses and gradient norms, bit for bit."""
    rows, _ = smoke(tmp_path, "recompute", "train_iters=4", *recompute)
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [
        (r["loss"], r["grad_norm"]) for r in runs["part"]]
