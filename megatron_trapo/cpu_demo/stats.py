"""The demo's statistics: mean ± std over seeds, and a paired comparison of two methods on the
same held-out problems and seeds (difference in accuracy with a bootstrap confidence interval
over seeds × problems, and a sign test over the problems where they disagree)."""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_trapo.data.synthetic import level_of, steps_written
from megatron_trapo.metrics import read_metrics

Correct = Dict[str, float]  # problem id -> share of its samples correct at the final evaluation


def final_rows(path: Path) -> List[dict]:
    """The rows of the last evaluated step of ``eval_samples.jsonl`` (one per sample)."""
    rows = read_metrics(path)  # any JSONL
    if not rows:
        raise ValueError(f"{path}: no evaluated problems")
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last]


def read_final_eval(rows: Sequence[dict]) -> Correct:
    """Per-problem accuracy of the last evaluation's ``rows`` (:func:`final_rows`): the mean
    over the problem's samples (``eval.k`` of them: avg@k; 1.0 / 0.0 for one sample)."""
    scores: Dict[str, List[float]] = {}
    for r in rows:
        scores.setdefault(r["id"], []).append(float(r["correct"]))
    return {pid: sum(v) / len(v) for pid, v in scores.items()}


def mean_std(values: Sequence[float]) -> tuple:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gain_over(reference: float, values: Sequence[float]) -> Tuple[float, float, float]:
    """The mean gain of ``values`` (one per seed) over ``reference``, their seed std, and the
    gain in units of that std (inf when the std is 0 and the gain is not; 0 with one seed)."""
    m, s = mean_std(values)
    gain = m - reference
    if len(values) < 2:
        return gain, 0.0, 0.0
    return gain, s, gain / s if s else (math.copysign(math.inf, gain) if gain else 0.0)


@dataclass(frozen=True)
class Paired:
    """``a`` minus ``b`` on the same seeds and problems (accuracy points in 0..1)."""

    diff: float
    low: float  # the bootstrap's 2.5 % quantile
    high: float  # its 97.5 % quantile
    wins: int  # (seed, problem) pairs that only ``a`` solved
    losses: int  # … that only ``b`` solved
    sign_p: float  # two-sided sign test over wins vs losses

    def row(self) -> str:
        return (f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}] "
                f"| {self.wins}/{self.losses} | {self.sign_p:.3g}")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses at p = 1/2 (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: Sequence[Correct], b: Sequence[Correct], reps: int = 2000, seed: int = 0,
           strata: Optional[Mapping[str, str]] = None) -> Paired:
    """Compare runs ``a[s]`` and ``b[s]`` of the same seed ``s`` on the problems both graded.
    The bootstrap resamples seeds, then problems, with replacement (the two sources of
    spread: training randomness and the finite held-out set). ``strata`` (problem id →
    source) makes the difference the mean of the sources' differences, as
    ``eval.average=sources`` averages accuracy, and resamples problems within each source."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs the same seeds on both sides "
                         f"({len(a)} vs {len(b)} runs)")
    ids = sorted(set.intersection(*(set(x) for x in (*a, *b))))
    if not ids:
        raise ValueError("the runs share no evaluated problem")
    missing = [i for i in ids if strata is not None and i not in strata]
    if missing:
        raise ValueError(f"paired comparison: no source for problems {missing[:5]}")
    groups: Dict[str, List[int]] = {}
    for n, i in enumerate(ids):
        groups.setdefault(strata[i] if strata is not None else "", []).append(n)
    d = [[a[s][i] - b[s][i] for i in ids] for s in range(len(a))]

    def mean(seeds: Sequence[int], picks: Sequence[Sequence[int]]) -> float:
        # each group weighs the same; within it every (seed, problem) pair does
        return sum(sum(d[s][n] for s in seeds for n in g) / (len(seeds) * len(g))
                   for g in picks) / len(picks)

    rng = random.Random(seed)
    boots = []
    for _ in range(reps):
        seeds = [rng.randrange(len(d)) for _ in d]
        boots.append(mean(seeds, [[g[rng.randrange(len(g))] for _ in g]
                                  for g in groups.values()]))
    boots.sort()
    flat = [x for row in d for x in row]
    wins, losses = sum(x > 0 for x in flat), sum(x < 0 for x in flat)
    return Paired(mean(range(len(d)), list(groups.values())), boots[int(0.025 * reps)],
                  boots[int(0.975 * reps) - 1], wins, losses, sign_test(wins, losses))


def by_source(correct: Correct, sources: Mapping[str, str]) -> Dict[str, float]:
    """Accuracy per source (the demo's difficulty levels) of one run."""
    out: Dict[str, List[float]] = {}
    for pid, c in correct.items():
        out.setdefault(sources[pid], []).append(c)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def _share_per_level(rows: Sequence[dict], sources: Mapping[str, str],
                     test: Callable[[int, int], bool]) -> Dict[str, float]:
    """Per difficulty (``synthetic-{n}step``), the share of ``rows`` whose answer's number of
    step lines w passes ``test(w, n)``."""
    out: Dict[str, List[float]] = {}
    for r in rows:
        source = sources.get(r["id"], "")
        level = level_of(source)
        if level is not None:
            out.setdefault(source, []).append(
                float(test(steps_written(r.get("text", "")), level)))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def right_length_share(rows: Sequence[dict], sources: Mapping[str, str]) -> Dict[str, float]:
    """Per difficulty (``synthetic-{n}step``), the share of the last evaluation's answers
    (:func:`final_rows`) that write exactly n steps: where a base never shown long chains fails
    them by stopping early, this separates "wrong number of steps" from "wrong arithmetic"."""
    return _share_per_level(rows, sources, lambda written, n: written == n)


def worked_share(rows: Sequence[dict], sources: Mapping[str, str]) -> Dict[str, float]:
    """Per difficulty, the share of answers that show any working (a step line): the base's
    habit of answering without it (``Sizes.pretrain_direct``) is what RL can drop."""
    return _share_per_level(rows, sources, lambda written, n: written > 0)
