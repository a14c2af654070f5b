"""The demo's figures, from each run's metrics.jsonl (curves averaged over seeds):

- ``accuracy.png``: held-out accuracy over steps per method, overall and per difficulty;
- ``training.png``: free-rollout reward (as logged, and with every difficulty weighted
  equally: a step's prompts are drawn at random, and the raw curve moves with their mix), the
  share of samples guided per micro-group level,
  the share of expert tokens outside the trust region (p < α), the policy's entropy, and the
  share of prompts whose free rollouts disagree (the only ones a group baseline learns from).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from matplotlib.figure import Figure

from megatron_trapo.metrics import read_metrics

Curve = List[Tuple[int, float]]


Value = Callable[[dict], Optional[float]]  # a metrics row's value; None: not logged there


def mean_curve(runs: Sequence[Path], key: Union[str, Value]) -> Curve:
    """``key`` (a metric's name, or a :data:`Value` of a row) per step, averaged over the runs
    that logged it at that step."""
    value = key if callable(key) else (lambda r: r.get(key))
    by_step: Dict[int, List[float]] = {}
    for run in runs:
        for r in read_metrics(run / "logs" / "metrics.jsonl"):
            v = value(r)
            if v is not None:
                by_step.setdefault(r["step"], []).append(v)
    return [(s, statistics.mean(v)) for s, v in sorted(by_step.items())]


def equal_weight(prefix: str) -> Value:
    """The mean of a row's metrics under ``prefix`` (one per difficulty), every one weighted
    the same whatever the step's mix of difficulties."""
    def value(r: dict) -> Optional[float]:
        parts = [v for k, v in r.items() if k.startswith(prefix)]
        return statistics.mean(parts) if parts else None
    return value


def _panel(ax, runs: Dict[str, Sequence[Path]], key: Union[str, Value], title: str,
           offset: Dict[str, int]) -> bool:
    drawn = False
    for method, paths in runs.items():
        curve = mean_curve(paths, key)
        if curve:
            ax.plot([s + offset.get(method, 0) for s, _ in curve], [v for _, v in curve],
                    marker="o" if len(curve) < 20 else None, label=method)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drawn


def plot_accuracy(out: Path, runs: Dict[str, Sequence[Path]], levels: Sequence[str],
                  offset: Dict[str, int]) -> Path:
    keys = [("eval/accuracy", "held-out accuracy")] + [
        (f"eval/accuracy/{lv}", lv) for lv in levels]
    fig = Figure(figsize=(3.4 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys))
    for ax, (key, title) in zip(axes, keys):
        _panel(ax, runs, key, title, offset)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out accuracy (mean over seeds; greedy)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    return out / "accuracy.png"


def plot_training(out: Path, runs: Dict[str, Sequence[Path]], offset: Dict[str, int],
                  schedule_methods: Sequence[str]) -> Path:
    fig = Figure(figsize=(24, 3.6))
    axes = fig.subplots(1, 6)
    _panel(axes[0], runs, "rollout/reward_unguided", "free-rollout reward", offset)
    axes[0].legend(fontsize=8)
    if not _panel(axes[5], runs, equal_weight("rollout/reward_unguided/"),
                  "free-rollout reward, difficulties weighted equally", offset):
        # runs made before the step logged per-source rewards
        axes[5].text(0.5, 0.5, "not logged by these runs", ha="center", va="center",
                     transform=axes[5].transAxes)
    guided = {m: runs[m] for m in schedule_methods if m in runs}
    for level in (1, 2, 3):
        for method, paths in guided.items():
            curve = mean_curve(paths, f"rollout/guided_share/level{level}")
            if curve:
                axes[1].plot(*zip(*curve), label=f"{method} level {level}",
                             linestyle=("-", "--", ":")[level - 1])
    axes[1].set_title("share guided per micro-group level", fontsize=10)
    axes[1].set_xlabel("step")
    axes[1].grid(alpha=0.3)
    if guided:
        axes[1].legend(fontsize=7)
    _panel(axes[2], {m: runs[m] for m in runs if m in schedule_methods or m == "luffy"},
           "expert/outside_trust_region", "expert tokens with p < α", offset)
    _panel(axes[3], runs, "pg/entropy", "entropy of the policy's tokens", offset)
    _panel(axes[4], runs, "rollout/prompts_with_signal",
           "prompts whose free rollouts disagree", offset)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    return out / "training.png"
