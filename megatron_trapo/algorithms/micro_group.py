"""TRAPO's micro-group sampling schedule (TRAPO.md §2) — pure decisions, no engine calls.

A prompt's group of G samples is built from micro-groups i = 1..N with budgets n_i, prefix
ratios L_i and thresholds t_i. Before micro-group i, if the prompt's samples so far score
below the threshold, its n_i samples continue the first L_i of an expert solution (guided);
otherwise they are free rollouts. L = 1.0 is the whole solution (plus EOS): a pure TrSFT
sample with no generated tokens. Thresholds are on the mean reward (the paper) or on
cumulative correct counts (the reference code) — a config value, as is which samples of a
guided micro-group train on their prefix and which expert trace each level uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from megatron_trapo.config import ConfigError


@dataclass
class MicroGroupConfig:
    """Defaults: the paper's n = (4, 2, 1, 1), L = (0, 0.25, 0.5, 1.0), t = (−1, .5, .7, .9)."""

    budgets: List[int] = field(default_factory=lambda: [4, 2, 1, 1])
    prefix_ratios: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    threshold_mode: str = "count"  # count (reference code) | mean (paper text)
    mean_thresholds: List[float] = field(default_factory=lambda: [-1.0, 0.5, 0.7, 0.9])
    count_thresholds: List[int] = field(default_factory=lambda: [0, 2, 4, 7])  # guided if correct < c
    # per level, per sample: train the prefix with TrSFT (1) or use it as context only (0)
    sft_flags: List[List[int]] = field(default_factory=lambda: [[0, 0, 0, 0], [0, 1], [1], [1]])
    trace_index: List[int] = field(default_factory=lambda: [0, 0, 0, 1])  # expert trace per level
    snap_window: float = 0.3  # snap the cut forward to a "\n\n" token within ratio + window

    def __post_init__(self) -> None:
        n = len(self.budgets)
        for name in ("prefix_ratios", "mean_thresholds", "count_thresholds", "sft_flags",
                     "trace_index"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"sampler.{name} has {len(getattr(self, name))} entries, "
                                  f"sampler.budgets has {n}")
        for i, (b, flags) in enumerate(zip(self.budgets, self.sft_flags)):
            if len(flags) != b:
                raise ConfigError(f"sampler.sft_flags[{i}] has {len(flags)} flags for a budget of {b}")
        if self.threshold_mode not in ("count", "mean"):
            raise ConfigError(f"sampler.threshold_mode={self.threshold_mode!r} is not count|mean")
        if any(not 0.0 <= r <= 1.0 for r in self.prefix_ratios):
            raise ConfigError(f"sampler.prefix_ratios must be in [0, 1], got {self.prefix_ratios}")

    @property
    def group_size(self) -> int:
        return sum(self.budgets)


def is_guided(cfg: MicroGroupConfig, level: int, rewards_so_far: Sequence[float]) -> bool:
    """Whether micro-group ``level`` (0-based) is guided, given the prompt's rewards so far."""
    if cfg.prefix_ratios[level] == 0.0:
        return False
    if cfg.threshold_mode == "mean":
        if not rewards_so_far:
            return cfg.mean_thresholds[level] > 0
        return sum(rewards_so_far) / len(rewards_so_far) < cfg.mean_thresholds[level]
    return sum(1 for r in rewards_so_far if r > 0.5) < cfg.count_thresholds[level]


def cut_prefix(token_texts: Sequence[str], ratio: float, window: float = 0.3) -> int:
    """Number of expert tokens in the prefix of ``ratio``: int(ratio·len), moved forward to just
    after the first token containing "\\n\\n" at or after that point if it lies before
    (ratio + window)·len."""
    n = len(token_texts)
    if ratio >= 1.0:
        return n
    cut = int(ratio * n)
    limit = (ratio + window) * n
    for k in range(cut, n):
        if k >= limit:
            break
        if "\n\n" in token_texts[k]:
            return k + 1
    return cut


@dataclass
class Planned:
    """What one sample of a prompt's group will be."""

    level: int
    guided: bool
    prefix_ratio: float
    train_prefix: bool
    trace: int

    @property
    def full_solution(self) -> bool:
        return self.guided and self.prefix_ratio >= 1.0


def plan_level(cfg: MicroGroupConfig, level: int, rewards_so_far: Sequence[float],
               num_traces: int) -> List[Planned]:
    """The samples of micro-group ``level`` for a prompt (no guidance without an expert trace)."""
    guided = num_traces > 0 and is_guided(cfg, level, rewards_so_far)
    trace = min(cfg.trace_index[level], max(num_traces - 1, 0))
    return [Planned(level, guided, cfg.prefix_ratios[level] if guided else 0.0,
                    guided and bool(flag), trace) for flag in cfg.sft_flags[level]]


def plan_group(cfg: MicroGroupConfig, rewards: Sequence[float], num_traces: int = 1) -> List[Planned]:
    """The whole group's plan, given the rewards its samples got in order (for tests and
    offline analysis; the trainer plans level by level as rewards arrive)."""
    out: List[Planned] = []
    for level in range(len(cfg.budgets)):
        out += plan_level(cfg, level, list(rewards[:len(out)]), num_traces)
    return out
