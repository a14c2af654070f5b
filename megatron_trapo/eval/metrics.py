"""avg@k and the unbiased pass@k estimator (Chen et al., 2021) over per-sample verdicts."""
from __future__ import annotations

from math import comb
from typing import Dict, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c correct:
    1 − C(n−c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(verdicts: Dict[int, Sequence[bool]]) -> Dict[str, float]:
    """Per benchmark: avg@n (mean correctness over all samples) and pass@k for k = 1, 2, 4, …
    up to the smallest sample count of any problem."""
    if not verdicts:
        raise ValueError("no verdicts to summarise")
    n_min = min(len(v) for v in verdicts.values())
    out = {"problems": float(len(verdicts)), "samples_per_problem": float(n_min),
           f"avg@{n_min}": sum(sum(v) / len(v) for v in verdicts.values()) / len(verdicts)}
    k = 1
    while k <= n_min:
        out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in verdicts.values()) / len(verdicts)
        k *= 2
    return out
