"""Training curves as a PNG, from a run's metrics.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from megatron_trapo.metrics import read_metrics

DEFAULT_KEYS = ("loss", "rollout/reward_unguided", "rollout/reward_first_micro_group",
                "eval/accuracy", "rollout/guided_fraction", "pg/entropy", "expert/nll")


def plot_curves(metrics_path: str | Path, out_png: str | Path,
                keys: Sequence[str] = DEFAULT_KEYS, title: str = "") -> Path:
    records = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in records)]
    fig = Figure(figsize=(4 * max(len(keys), 1), 3.2))
    axes = fig.subplots(1, max(len(keys), 1))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return Path(out_png)
