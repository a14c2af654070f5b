"""Metrics: JSONL always, TensorBoard and Weights & Biases when installed and asked for.

Only the process that owns logging (global rank 0) writes; the others get a no-op logger.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional


class MetricsLogger:
    """Append one JSON object per step to ``DIR/metrics.jsonl`` (+ optional backends)."""

    def __init__(self, log_dir: Optional[str | Path], enabled: bool = True,
                 tensorboard: bool = True, wandb_project: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled and log_dir is not None
        self._tb = None
        self._wandb = None
        self._file = None
        if not self.enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                # lazy: optional dependency (extra [tensorboard])
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None
        project = wandb_project or os.environ.get("WANDB_PROJECT")
        if project:
            try:
                # lazy: optional dependency (extra [wandb])
                import wandb

                self._wandb = wandb.init(project=project, name=run_name, config=config or {},
                                         dir=str(self.dir))
            except ImportError:
                self._wandb = None

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def continue_log(path: Path, start: int) -> None:
    """Make ``path`` (a metrics.jsonl, or any JSONL with a ``step`` per row) end at step
    ``start``: a resumed run drops the rows a crashed run wrote past its last checkpoint (they
    are logged again, identically, by the resumed run); a fresh run (``start`` 0) moves an
    older log aside to ``metrics.N.jsonl``."""
    path = Path(path)
    if not path.is_file():
        return
    if start == 0:
        n = 1
        while path.with_name(f"{path.stem}.{n}{path.suffix}").exists():
            n += 1
        path.rename(path.with_name(f"{path.stem}.{n}{path.suffix}"))
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start:
                kept.append(line)
        except json.JSONDecodeError:  # a row cut off by the crash
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
