"""One stage of the demo: a ``megatron-trapo train`` run under torchrun, its log in a file,
skipped when it finished before with the same settings (``final.json``, ``stage_args.json``),
continued from its last checkpoint when a previous attempt with them was cut off, run afresh
when its settings changed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from megatron_trapo.algorithms.methods import stages
from megatron_trapo.config import TrainConfig, load_config
from megatron_trapo.metrics import read_metrics

# The demo's model: a 4-layer Llama-style GPT small enough for a 2-core laptop.
MODEL = {"model_preset": "tiny", "model.num_layers": 4, "model.hidden_size": 128,
         "model.ffn_hidden_size": 512, "model.num_attention_heads": 4,
         "model.num_query_groups": 2, "model.vocab_size": 384,
         "model.max_position_embeddings": 256}


def stage_args(run: Path, overrides: Dict[str, object]) -> List[str]:
    """The ``key=value`` arguments of the stage whose folder is ``run``."""
    return [f"{k}={_value(v)}" for k, v in {**MODEL, **overrides, "log_dir": run / "logs",
                                             "checkpoint.save": run / "ckpt"}.items()]


def resolved_config(args: List[str]) -> dict:
    """Every setting the trainer will run with, defaults included, as JSON values: a stage is
    reused only if these are the same, so a default changed in the code re-runs it."""
    cfg = dataclasses.asdict(load_config(TrainConfig, None, args))
    return json.loads(json.dumps(cfg, default=str))


def method_values(config: dict) -> List[dict]:
    """What the stage's loss_mode does (algorithms/methods.py), field by field: a method whose
    meaning the code changed (e.g. the advantage its expert tokens get) is run again."""
    return [dataclasses.asdict(m) for m in stages(config["loss"]["loss_mode"])]


def inputs(overrides: Dict[str, object]) -> Dict[str, str]:
    """What the stage reads, by content: the SHA-256 of each data file it is given, and for a
    checkpoint it starts from, the ``final.json`` of the stage that wrote it (rewritten each
    time that stage runs) — so a base made again, or splits drawn again, re-run what used
    them, where paths alone would not change."""
    out = {}
    for key, value in overrides.items():
        if not isinstance(value, Path):
            continue
        path = value.parent / "final.json" if key == "load" else value
        if path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_stage(out: Path, name: str, overrides: Dict[str, object], nproc: int = 2) -> Path:
    """Run ``megatron-trapo train`` with the demo's model and ``overrides`` into
    ``out/runs/name`` (logs in ``logs/``, checkpoint in ``ckpt/``)."""
    run = out / "runs" / name
    done, recorded = run / "final.json", run / "stage_args.json"
    args = stage_args(run, overrides)
    config = resolved_config(args)
    settings = {"args": args, "config": config, "methods": method_values(config),
                "inputs": inputs(overrides)}
    if recorded.is_file() and json.loads(recorded.read_text()) == settings:
        if done.is_file():
            return run
    elif run.exists():  # made with other settings (an lr --tune has changed since, a default
        # or method the code changed) or by a version that did not record them: neither its
        # result nor its checkpoint is this stage's
        print(f"[{time.strftime('%H:%M:%S')}] {name}: settings differ from the earlier run "
              f"in {run}; running it again", flush=True)
        shutil.rmtree(run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_trapo.cli", "train",
           "--resume", *args]  # a stage cut off earlier continues from its last checkpoint
    run.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings))
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    t0 = time.time()
    with open(out / "runs" / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see "
                         f"{out / 'runs' / (name + '.log')}")
    evals = [r for r in metrics(run) if "eval/accuracy" in r]
    done.write_text(json.dumps({"first_eval": evals[0], "last_eval": evals[-1],
                                "wall_s": time.time() - t0}))
    return run


def _value(v: object) -> str:
    """An override's value as the config parser (YAML) reads it back: a text with braces or a
    newline, such as a prompt template, goes as a quoted string."""
    if v is None:
        return "null"
    text = str(v)
    return json.dumps(text) if any(c in text for c in "{}[]:#'\"\n") else text


def metrics(run: Path) -> List[dict]:
    return read_metrics(run / "logs" / "metrics.jsonl")


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())
