"""profiling.*: a torch.profiler window over exactly the configured steps, on the chosen ranks."""
import json

import pytest
import torch

from megatron_trapo.config import ConfigError, ProfilingConfig
from megatron_trapo.train.profiling import StepProfiler


def _loop(profiler: StepProfiler, steps: int) -> None:
    with profiler:
        for step in range(steps):
            profiler.before(step)
            with torch.profiler.record_function(f"trapo_step_{step + 1}"):
                torch.mm(torch.ones(64, 64), torch.ones(64, 64))
            profiler.after(step)


def _marked_steps(trace) -> list:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("trapo_step_")})


def test_the_window_holds_exactly_the_configured_steps(tmp_path):
    cfg = ProfilingConfig(profile=True, profile_step_start=2, profile_step_end=4)
    _loop(StepProfiler(cfg, str(tmp_path), rank=0), steps=6)
    assert _marked_steps(tmp_path / "profile" / "trace_rank0.json") == ["trapo_step_3",
                                                                        "trapo_step_4"]
    table = (tmp_path / "profile" / "ops_rank0.txt").read_text()
    assert "aten::mm" in table


def test_other_ranks_and_a_run_that_ends_inside_the_window(tmp_path):
    cfg = ProfilingConfig(profile=True, profile_step_start=1, profile_step_end=10,
                          profile_ranks=[1])
    _loop(StepProfiler(cfg, str(tmp_path / "r0"), rank=0), steps=3)
    assert not (tmp_path / "r0" / "profile").exists()
    _loop(StepProfiler(cfg, str(tmp_path / "r1"), rank=1), steps=3)  # ends at step 3 of 10
    assert _marked_steps(tmp_path / "r1" / "profile" / "trace_rank1.json") == [
        "trapo_step_2", "trapo_step_3"]


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="profile_step_start=5 and profile_step_end=5"):
        ProfilingConfig(profile_step_start=5, profile_step_end=5)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use_pytorch_profiler=false"):
            StepProfiler(ProfilingConfig(profile=True, use_pytorch_profiler=False), None, 0)
