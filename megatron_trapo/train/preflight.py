"""Everything a training run needs, checked before any model is built, on every rank.

A problem that would otherwise stop the run hours later — a folder it cannot write, a
checkpoint it cannot read, a tokenizer folder that is not there, a data row the chosen method
cannot use — is found here in seconds and reported in one line naming the field, file or row.
Invalid rows are skipped and reported (count and the first line numbers, 1-based) in the log
and the metrics; with ``data.strict=true`` they are refused. A fresh run into a checkpoint
folder that holds a run is refused unless ``--resume`` or ``--overwrite``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from transformers import AutoTokenizer

from megatron_trapo.algorithms.methods import stages
from megatron_trapo.config import ConfigError, TrainConfig
from megatron_trapo.data.items import encode
from megatron_trapo.data.records import data_file, record_problem, scan_rows, to_record
from megatron_trapo.train.checkpoint import (CheckpointError, LATEST_FILE, iteration_dir,
                                             latest_iteration, read_meta)

# methods whose samples are built from an expert solution (TRAPO's guided micro-groups, SFT's
# targets, LUFFY's off-policy sample)


@dataclass
class DataReport:
    """What :func:`check_data` kept and skipped of one file."""

    path: str
    kept: int = 0
    skipped: Dict[str, List[int]] = field(default_factory=dict)  # reason → 1-based lines

    def skip(self, reason: str, line: int) -> None:
        self.skipped.setdefault(reason, []).append(line)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def metrics(self, name: str) -> Dict[str, float]:
        return {f"data/{name}_rows_kept": float(self.kept),
                f"data/{name}_rows_skipped": float(self.n_skipped)}

    def summary(self, first: int = 5) -> str:
        head = f"{self.path}: {self.kept} row(s) kept"
        if not self.skipped:
            return head
        parts = [f"{len(lines)} {why} (line{'s' if len(lines) > 1 else ''} "
                 f"{', '.join(map(str, lines[:first]))}{', …' if len(lines) > first else ''})"
                 for why, lines in self.skipped.items()]
        return f"{head}, {self.n_skipped} skipped: " + "; ".join(parts)


def expert_text_of(cfg: TrainConfig) -> str:
    """``data.expert_text`` resolved: ``method`` is the text the run's method trains on (of a
    pipeline, its first stage that reads expert solutions; each stage's own preflight then
    encodes the data for that stage)."""
    if cfg.data.expert_text != "method":
        return cfg.data.expert_text
    readers = [m for m in stages(cfg.loss.loss_mode) if m.needs_solution]
    return readers[0].expert_text if readers else "reasoning"


def check_data(path: str, tokenizer, cfg: TrainConfig, max_positions: int,
               needs_solution: bool, what: str):
    """The file's usable rows as encoded prompt items, and the report of the others."""
    rows, bad = scan_rows(data_file(path, what))
    report = DataReport(str(path))
    for line, why in bad:
        report.skip(why, line)
    limit = cfg.data.max_prompt_tokens
    sft = any(m.sampling == "expert_only" for m in stages(cfg.loss.loss_mode))
    items = []
    for line, row in rows:
        why = record_problem(row)
        if why is None and needs_solution and not (row.get("solutions") or []):
            why = f"without an expert solution (loss_mode={cfg.loss.loss_mode} needs one)"
        if why is not None:
            report.skip(why, line)
            continue
        item = encode([to_record(row)], tokenizer, cfg.data.prompt_template,
                      cfg.data.system_prompt, expert_text_of(cfg))[0]
        n = len(item.prompt_ids)
        if limit is not None and n > limit:
            report.skip(f"with a prompt over data.max_prompt_tokens={limit}", line)
        elif n >= max_positions:
            report.skip(f"with a prompt that does not fit the model's {max_positions} "
                        "positions", line)
        elif sft and item.traces and n + min(len(item.traces[0]) + 1,
                                             cfg.loss.max_response_length) > min(
                max_positions, cfg.batching.max_tokens_per_microbatch):
            report.skip("whose prompt + expert solution exceed the model's positions or "
                        "batching.max_tokens_per_microbatch", line)
        else:
            items.append(item)
    report.kept = len(items)
    if not items:
        raise ConfigError(f"{what}={path}: no usable row. {report.summary()}")
    if cfg.data.strict and report.skipped:
        raise ConfigError(f"{what}: data.strict=true and {report.summary()}")
    return items, report


def _writable(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write a probe file into it."""
    path = Path(folder)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what}={folder}: cannot write there ({exc.strerror or exc})") from None


def tokenizer_folder(cfg: TrainConfig) -> str:
    if cfg.rollout.tokenizer_path:
        path = cfg.rollout.tokenizer_path
        if not Path(path).is_dir():
            raise ConfigError(f"rollout.tokenizer_path={path}: no such folder (tokenizers are "
                              "read from local folders; nothing is downloaded)")
        return path
    if cfg.load and (Path(cfg.load) / "hf" / "tokenizer_config.json").is_file():
        return str(Path(cfg.load) / "hf")
    raise ConfigError("no tokenizer: set rollout.tokenizer_path (or load a converted checkpoint "
                      "with an hf/ folder)")


def load_tokenizer(cfg: TrainConfig):
    path = tokenizer_folder(cfg)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tokenizer folder {path}: cannot load a tokenizer ({first})") from None


def check_paths(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Checkpoints to load readable, folders to write writable, no finished run overwritten."""
    if cfg.load:
        try:
            it = latest_iteration(cfg.load)
            if it is None:
                raise CheckpointError(f"no {LATEST_FILE}")
            read_meta(iteration_dir(cfg.load, it))
        except CheckpointError as exc:
            raise ConfigError(f"load={cfg.load}: not a readable checkpoint ({exc})") from None
    save = cfg.checkpoint.save
    if save:
        _writable(save, "checkpoint.save")
        try:
            latest = latest_iteration(save)
        except CheckpointError as exc:
            raise ConfigError(f"checkpoint.save={save}: {exc}") from None
        if latest is not None and not resume:
            if not overwrite:
                raise ConfigError(
                    f"checkpoint.save={save} holds a run (latest iteration {latest}): pass "
                    "--resume to continue it, --overwrite to start over, or choose another "
                    "folder")
            if int(os.environ.get("RANK", "0")) == 0:  # one rank clears it
                for old in Path(save).glob("iter_*"):
                    shutil.rmtree(old, ignore_errors=True)
                (Path(save) / LATEST_FILE).unlink(missing_ok=True)
    if cfg.log_dir:
        _writable(cfg.log_dir, "log_dir")


def check_all_data(cfg: TrainConfig, tokenizer, max_positions: int):
    """``(train items, eval items, {"train"/"eval": report})`` of ``train_data``, ``eval.data``."""
    if not cfg.train_data:
        raise ConfigError("train_data is required")
    reports, train, evals = {}, [], []
    if cfg.train_data:
        train, reports["train"] = check_data(cfg.train_data, tokenizer, cfg, max_positions,
                                             any(m.needs_solution for m in
                                                 stages(cfg.loss.loss_mode)), "train_data")
    if cfg.eval.data:
        evals, reports["eval"] = check_data(cfg.eval.data, tokenizer, cfg, max_positions, False,
                                            "eval.data")
    return train, evals, reports
