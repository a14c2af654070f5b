"""A demo stage is reused only when it was made with the same settings: a run left by another
lr (``--tune`` changes the lrs after the table's runs may exist) is run again from scratch."""
from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from megatron_trapo.cpu_demo import stage


@pytest.fixture
def trainer_calls(monkeypatch):
    """``subprocess.run`` as a trainer that logs one evaluation of accuracy = its lr."""
    calls = []

    def fake_run(cmd, **kwargs):
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("--"))
        logs = stage.Path(args["log_dir"])
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "eval/accuracy": float(args["optimizer.lr"])}) + "\n")
        calls.append(args)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(stage.subprocess, "run", fake_run)
    return calls


def test_a_stage_with_the_same_settings_is_reused(tmp_path, trainer_calls):
    run = stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    assert stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5}) == run
    assert len(trainer_calls) == 1


def test_a_stage_with_other_settings_runs_again_from_scratch(tmp_path, trainer_calls):
    stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    (tmp_path / "runs" / "grpo_seed1" / "ckpt").mkdir()  # the old lr's checkpoint
    run = stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 3e-5})
    assert len(trainer_calls) == 2
    assert not (run / "ckpt").exists()  # not resumed from the old lr's weights
    assert stage.final(run)["last_eval"]["eval/accuracy"] == 3e-5  # nor its result kept
    assert len(stage.metrics(run)) == 1  # nor its metrics


def test_a_stage_whose_defaults_changed_runs_again(tmp_path, trainer_calls, monkeypatch):
    """The same arguments, but a default of the trainer's config changed in the code since."""
    stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    resolved = stage.resolved_config

    def other_default(args):
        cfg = resolved(args)
        cfg["optimizer"]["weight_decay"] += 0.5
        return cfg

    monkeypatch.setattr(stage, "resolved_config", other_default)
    stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    assert len(trainer_calls) == 2


def test_a_stage_whose_method_changed_runs_again(tmp_path, trainer_calls, monkeypatch):
    """The same arguments and config, but the code changed what the method does (as when
    the +LUFFY-loss ablation's prefixes got the reference's advantage of 1)."""
    from megatron_trapo.algorithms import methods

    args = {"optimizer.lr": 1e-5, "loss.loss_mode": "trapo_luffy_prefix"}
    stage.run_stage(tmp_path, "ablation_seed1", args)
    changed = dataclasses.replace(methods.METHODS["trapo_luffy_prefix"],
                                  expert_advantage="sample")
    monkeypatch.setitem(methods.METHODS, "trapo_luffy_prefix", changed)
    stage.run_stage(tmp_path, "ablation_seed1", args)
    assert len(trainer_calls) == 2
    stage.run_stage(tmp_path, "ablation_seed1", args)  # unchanged since: reused
    assert len(trainer_calls) == 2


def test_a_stage_without_recorded_settings_is_not_trusted(tmp_path, trainer_calls):
    old = tmp_path / "runs" / "grpo_seed1"
    old.mkdir(parents=True)
    (old / "final.json").write_text(json.dumps({"last_eval": {"eval/accuracy": 0.9}}))
    run = stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    assert len(trainer_calls) == 1 and stage.final(run)["last_eval"]["eval/accuracy"] == 1e-5


def test_a_stage_cut_off_with_the_same_settings_resumes(tmp_path, trainer_calls):
    run = stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    (run / "final.json").unlink()  # cut off before it finished
    (run / "ckpt").mkdir()
    stage.run_stage(tmp_path, "grpo_seed1", {"optimizer.lr": 1e-5})
    assert len(trainer_calls) == 2 and (run / "ckpt").is_dir()  # its checkpoint kept for --resume


def test_a_stage_whose_data_or_starting_run_changed_runs_again(tmp_path, trainer_calls):
    """The same arguments and paths, but the file behind a path changed: splits drawn again
    (another ``Sizes``), or the base it starts from made again (its ``final.json`` is new)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "a"}\n')
    base = stage.run_stage(tmp_path, "base", {"optimizer.lr": 1e-3, "train_data": data})
    args = {"optimizer.lr": 1e-5, "train_data": data, "load": base / "ckpt"}
    stage.run_stage(tmp_path, "grpo_seed1", args)
    stage.run_stage(tmp_path, "grpo_seed1", args)
    assert len(trainer_calls) == 2  # unchanged: reused
    data.write_text('{"problem": "b"}\n')  # the splits drawn again
    stage.run_stage(tmp_path, "base", {"optimizer.lr": 1e-3, "train_data": data})
    assert len(trainer_calls) == 3  # the base runs again on them
    stage.run_stage(tmp_path, "grpo_seed1", args)
    assert len(trainer_calls) == 4  # and so does the run from it (its data and its base)
    (base / "final.json").write_text('{"wall_s": 1}')  # only the base made again
    stage.run_stage(tmp_path, "grpo_seed1", {**args, "train_data": data})
    assert len(trainer_calls) == 5
