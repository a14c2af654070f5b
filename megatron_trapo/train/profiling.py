"""Megatron's ``--profile`` for this trainer (``profiling.*``): a torch.profiler window over a
few steps on chosen ranks, or an nsys capture range. The timers say which phase is slow; this
says which ops inside it are."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from megatron_trapo.config import ConfigError, ProfilingConfig

logger = logging.getLogger(__name__)


class StepProfiler:
    """``before(step)`` / ``after(step)`` around each step (0-based indices); profiles steps
    ``profile_step_start`` ≤ index < ``profile_step_end``. Leaving the ``with`` block (the run
    ended or was preempted inside the window) closes the window and writes what it has."""

    def __init__(self, cfg: ProfilingConfig, log_dir: Optional[str], rank: int):
        self.cfg = cfg
        self.on = cfg.profile and rank in cfg.profile_ranks
        self.rank = rank
        self.out = Path(log_dir or ".") / "profile"
        self._prof = None
        self._nsys = False
        if self.on and not cfg.use_pytorch_profiler and not torch.cuda.is_available():
            raise ConfigError("profiling.use_pytorch_profiler=false marks the steps for nsys "
                              "(cudaProfilerStart/Stop), which needs CUDA; on CPU use the "
                              "PyTorch profiler")

    def before(self, step: int) -> None:
        if not self.on or step != self.cfg.profile_step_start:
            return
        if not self.cfg.use_pytorch_profiler:
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys = True
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities,
                                            record_shapes=self.cfg.record_shapes)
        self._prof.__enter__()

    def after(self, step: int) -> None:
        if step + 1 == self.cfg.profile_step_end:
            self.close()

    def close(self) -> None:
        if self._nsys:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys = False
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=self.cfg.record_shapes).table(
            sort_by=sort, row_limit=60)
        (self.out / f"ops_rank{self.rank}.txt").write_text(table + "\n")
        logger.info("profile of steps %d-%d: %s (open in Perfetto or chrome://tracing), "
                    "op table %s", self.cfg.profile_step_start + 1, self.cfg.profile_step_end,
                    trace, self.out / f"ops_rank{self.rank}.txt")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
