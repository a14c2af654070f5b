"""Stopping a run cleanly when asked: Slurm preemption, time limits, an operator.

A stop is requested by SIGTERM or SIGUSR1 to a training process (what ``sbatch --signal`` and
``scancel --signal`` send), or by a file ``STOP`` in the checkpoint folder (what the launcher
writes when it gets the signal: torchrun would die of SIGUSR1 and gives workers only ~30 s after
SIGTERM, so across nodes a file on the shared filesystem is the reliable channel; an operator can
``touch`` it too). The trainer asks :meth:`StopRequest.agreed` after every step: all ranks agree
(one all-reduce), finish that step, save a checkpoint, record ``preempted.json`` and exit with
:data:`PREEMPTED_EXIT`, which the launcher turns into a Slurm requeue. Finishing the step (rather
than aborting it) keeps the resume exact: the run restarts at a step boundary.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "try again later" — the scripts requeue on it
STOP_FILE = "STOP"
RECORD_FILE = "preempted.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# the ranks agree on a stop by an all-reduce MAX of one code: a signal number, or this for the
# stop file (above every signal number, so a signal on any rank names the reason)
STOP_FILE_CODE = 1000


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint is written."""

    def __init__(self, step: int, reason: str, saved: bool):
        super().__init__(f"stopped at step {step} ({reason}); "
                         + ("checkpoint saved: resume with --resume" if saved else
                            "no checkpoint.save, so nothing was saved"))
        self.step, self.reason, self.saved = step, reason, saved


def stop_file(save_dir: Optional[str]) -> Optional[Path]:
    return Path(save_dir) / STOP_FILE if save_dir else None


def request_stop(save_dir: str, reason: str) -> Path:
    """What the launcher (or an operator) does: ask the running trainer to stop after its step."""
    path = stop_file(save_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")
    return path


def read_record(save_dir: Optional[str]) -> Optional[dict]:
    path = Path(save_dir) / RECORD_FILE if save_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


class StopRequest:
    """Signal handlers on this rank plus the stop file (read by rank 0)."""

    def __init__(self, save_dir: Optional[str]):
        self.file = stop_file(save_dir)
        self.save_dir = save_dir
        self.signal: Optional[int] = None
        self._old = {}
        self.rank0 = torch.distributed.get_rank() == 0

    def __enter__(self) -> "StopRequest":
        if self.rank0 and self.file is not None and self.file.exists():
            # not removed here: it may be a request made while this run was starting
            logger.warning("a stop request exists (%s): this run stops after its next step; "
                           "delete the file to keep training", self.file)
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signal is None:
            logger.warning("got %s: finishing this step, then saving and stopping",
                           signal.Signals(signum).name)
        self.signal = signum

    def _local_code(self) -> int:
        if self.signal is not None:
            return int(self.signal)
        if self.rank0 and self.file is not None and self.file.exists():
            return STOP_FILE_CODE
        return 0

    def agreed(self) -> Optional[str]:
        """The reason to stop, the same on every rank (None: go on)."""
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        code = torch.tensor([self._local_code()], dtype=torch.long, device=device)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        value = int(code.item())
        if value == 0:
            return None
        return f"stop file {self.file}" if value == STOP_FILE_CODE else signal.Signals(value).name

    def record(self, step: int, reason: str, saved: bool) -> None:
        """``preempted.json`` beside the checkpoints: the launcher requeues on it."""
        if not self.rank0 or not self.save_dir:
            return
        if self.file is not None and self.file.exists():
            self.file.unlink()
        (Path(self.save_dir) / RECORD_FILE).write_text(json.dumps(
            {"step": step, "reason": reason, "saved": saved, "time": time.time()}) + "\n")
