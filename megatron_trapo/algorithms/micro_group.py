"""TRAPO's micro-group sampling schedule (docs/algorithm.md §2) — pure decisions, no engine calls.

A prompt's group of G samples is built from micro-groups i = 1..N with budgets n_i, prefix
ratios L_i and thresholds t_i. Before micro-group i, if the prompt's samples so far score
below the threshold, its n_i samples continue the first L_i of an expert solution (guided);
otherwise they are free rollouts. L = 1.0 is the whole solution (plus EOS): a pure TrSFT
sample with no generated tokens. Thresholds are on the mean reward (the paper) or on
cumulative correct counts (the reference code) — a config value, as is which samples of a
guided micro-group train on their prefix and which expert trace each level uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from megatron_trapo.config import MicroGroupConfig

__all__ = ["MicroGroupConfig", "Planned", "can_be_guided", "cut_prefix", "is_guided",
           "level_samples", "plan_group", "plan_level"]


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
    """Number of expert tokens in the prefix of ``ratio``, as the reference computes it
    (``get_prefix_end_idx``; fidelity review D9): over the trace *with* its EOS, n = len + 1,
    the plain cut is int(ratio·n); the first token containing "\\n\\n" strictly after it moves
    the cut to just past that token if it lies before (ratio + window)·n. ``token_texts`` is
    the trace already cut to the response budget (the reference truncates before cutting)."""
    if ratio >= 1.0:
        return len(token_texts)
    n = len(token_texts) + 1  # the EOS the reference appends before measuring
    cut = int(ratio * n)
    for k in range(cut + 1, len(token_texts)):
        if "\n\n" in token_texts[k]:
            return k + 1 if k < (ratio + window) * n else cut
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
    return level_samples(cfg, level, num_traces > 0 and is_guided(cfg, level, rewards_so_far),
                         num_traces)


def can_be_guided(cfg: MicroGroupConfig, level: int, num_traces: int) -> bool:
    """Whether some rewards would make micro-group ``level`` guided."""
    return num_traces > 0 and cfg.prefix_ratios[level] > 0.0


def level_samples(cfg: MicroGroupConfig, level: int, guided: bool, num_traces: int
                  ) -> List[Planned]:
    """The samples of micro-group ``level`` once it is decided whether it is guided."""
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
