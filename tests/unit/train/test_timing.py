"""The step's phase timers: what a phase accumulates, what is left as "other", the
throughputs, and that on a GPU each phase boundary synchronises the device (else a phase would
time the launch queue, not the kernels)."""
import time

import pytest
import torch

from megatron_trapo.rollout.types import Sample
from megatron_trapo.train.timing import PHASES, StepTimers, TimedEngine, postfix


@pytest.fixture
def syncs(monkeypatch):
    """torch.cuda.synchronize recorded (megatron's timers call it at every start and stop)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(time.time()))
    return calls


class SleepyEngine:
    def generate(self, requests):
        time.sleep(0.05)
        return [[Sample([1, 2, 3], [0.0] * 3, "stop", "0")] * 2 for _ in requests]


def test_phases_other_and_throughputs(syncs):
    timers = StepTimers()
    t0 = time.time()
    engine = TimedEngine(SleepyEngine(), timers)
    engine.generate([None, None])  # 2 requests × 2 samples × 3 tokens
    engine.generate([None])
    timers.timed("reward", time.sleep)(0.03)
    with timers.phase("forward_backward"):
        time.sleep(0.04)
    timers.count("train_tokens", 400)
    time.sleep(0.05)  # outside every phase
    out = timers.take(time.time() - t0)
    assert out["timing/rollout_generate_s"] == pytest.approx(0.10, abs=0.03)
    assert out["timing/reward_s"] == pytest.approx(0.03, abs=0.02)
    assert out["timing/optimizer_s"] == 0.0
    assert out["timing/other_s"] == pytest.approx(0.05, abs=0.03)
    total = sum(out[f"timing/{p}_s"] for p in PHASES) + out["timing/other_s"]
    assert total == pytest.approx(out["timing/iteration_s"], rel=1e-6)
    assert out["timing/other_fraction"] == pytest.approx(out["timing/other_s"]
                                                         / out["timing/iteration_s"])
    assert out["timing/generate_tokens_per_s"] == pytest.approx(
        18 / out["timing/rollout_generate_s"])
    assert out["timing/train_tokens_per_s"] == pytest.approx(400 / 0.04, rel=0.5)
    assert len(syncs) == 2 * 4  # start and stop of each of the 4 timed calls
    # take() resets: the next iteration starts from zero
    again = timers.take(1.0)
    assert again["timing/rollout_generate_s"] == 0.0 and "timing/generate_tokens_per_s" not in again
    bar = postfix({**out, "loss": 0.5})
    assert bar["gen"].endswith("s") and "other" in bar and bar["loss"] == "0.5000"


def test_unknown_phase_is_refused(syncs):
    with pytest.raises(ValueError, match="unknown phase 'rollout'"):
        with StepTimers().phase("rollout"):
            pass
