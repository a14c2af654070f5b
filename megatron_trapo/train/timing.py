"""Where a step's time goes: one wall-clock timer per phase, logged every step as
``timing/<phase>_s`` with ``timing/other_s`` (the iteration's time outside every phase) and
``timing/other_fraction``, plus generation and training throughput.

The timers are megatron-core's (``megatron.core.timers``): on a GPU they synchronise the device
at start and stop, so a phase's time is its kernels' time, not the launch queue's. Phases are
timed on the rank that logs (global rank 0); with data-parallel rollouts every rank generates
its share at the same time, so rank 0's generation time is the step's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Sequence

from megatron.core.timers import Timers

# in the order a step runs them
PHASES = ("rollout_generate", "reward", "old_logprobs", "forward_backward", "optimizer",
          "weight_sync", "eval", "checkpoint")


class StepTimers:
    """Accumulates each phase's seconds (a phase may run several times in a step: one
    generation per micro-group level) and counts (tokens), read and reset by :meth:`take`."""

    def __init__(self) -> None:
        self._timers = Timers(log_level=0, log_option="max")
        self.counts: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        timer = self._timers(name, log_level=0)
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` with every call timed as phase ``name``."""
        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return call

    def count(self, name: str, value: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(value)

    def take(self, iteration_s: float) -> Dict[str, float]:
        """This iteration's metrics (then reset): per-phase seconds, the rest as ``other``,
        and tokens/s of generation and of training (forward/backward + optimizer)."""
        seconds = {p: self._timers(p, log_level=0).elapsed(reset=True) for p in PHASES}
        out = {f"timing/{p}_s": s for p, s in seconds.items()}
        other = max(iteration_s - sum(seconds.values()), 0.0)
        out["timing/other_s"] = other
        out["timing/iteration_s"] = iteration_s
        out["timing/other_fraction"] = other / iteration_s if iteration_s > 0 else 0.0
        gen, train = seconds["rollout_generate"], seconds["forward_backward"] + seconds["optimizer"]
        if gen > 0:
            out["timing/generate_tokens_per_s"] = self.counts.get("generated_tokens", 0.0) / gen
        if train > 0:
            out["timing/train_tokens_per_s"] = self.counts.get("train_tokens", 0.0) / train
        self.counts = {}
        return out


class TimedEngine:
    """The engine as the sampler sees it, with each ``generate`` timed and its generated
    tokens counted (the sampler calls nothing else)."""

    def __init__(self, engine, timers: StepTimers) -> None:
        self.engine, self.timers = engine, timers

    def generate(self, requests: Sequence) -> List:
        with self.timers.phase("rollout_generate"):
            out = self.engine.generate(requests)
        self.timers.count("generated_tokens", sum(len(s.token_ids) for group in out
                                                  for s in group))
        return out


def postfix(metrics: Dict[str, float]) -> Dict[str, str]:
    """The progress bar's postfix: loss, reward, and the step's biggest phases."""
    out = {"loss": f"{metrics.get('loss', 0):.4f}",
           "reward": f"{metrics.get('rollout/reward_unguided', float('nan')):.2f}"}
    short = {"rollout_generate": "gen", "forward_backward": "fb", "optimizer": "opt",
             "old_logprobs": "oldlp", "weight_sync": "sync", "reward": "rew", "eval": "eval",
             "checkpoint": "ckpt"}
    phases = sorted(((metrics.get(f"timing/{p}_s", 0.0), p) for p in PHASES), reverse=True)
    for seconds, p in phases[:3]:
        if seconds > 0:
            out[short[p]] = f"{seconds:.2f}s"
    if "timing/other_s" in metrics:
        out["other"] = f"{metrics['timing/other_s']:.2f}s"
    return out
