"""Binary math reward: 1 if the last ``\\boxed{…}`` of prefix + completion is equivalent to the
ground truth under math-verify, else 0 (TRAPO.md §3; no format reward).

math-verify's own timeouts use signals, which only work in a process's main thread, and a
pathological answer (``\\boxed{10^{10^{10}}}``) can take seconds or hang in sympy. So answers are
verified in a pebble process pool: each task runs in a worker's main thread with math-verify's
timeout, and a hard per-answer deadline kills a stuck worker (pebble replaces it) and scores 0.
"""
from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FutureTimeout
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces matched; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the answer was cut off


def _as_latex(answer: str) -> str:
    answer = answer.strip()
    return answer if answer.startswith("$") or "\\boxed" in answer else f"${answer}$"


def verify_answer(response: str, ground_truth: str, timeout_s: int = 3) -> float:
    """The reward of one response (runs in a pool worker's main thread)."""
    from math_verify import parse, verify

    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
        return 0.0
    gold = parse(_as_latex(ground_truth), parsing_timeout=timeout_s)
    pred = parse(_as_latex(boxed), parsing_timeout=timeout_s)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout_s) else 0.0


class MathReward:
    """A pool of verifier processes with a hard deadline per answer."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0):
        from pebble import ProcessPool

        self.timeout_s = timeout_s
        self.pool = ProcessPool(max_workers=num_workers)
        self.timeouts = 0  # answers killed at the hard deadline (metric)

    def score(self, pairs: Sequence[Tuple[str, str]]) -> List[float]:
        """Rewards of (response text, ground truth) pairs, in order."""
        inner = max(1, int(self.timeout_s) - 1)
        futures = [self.pool.schedule(verify_answer, args=(text, gt, inner), timeout=self.timeout_s)
                   for text, gt in pairs]
        out = []
        for fut in futures:
            try:
                out.append(float(fut.result()))
            except FutureTimeout:
                self.timeouts += 1
                out.append(0.0)
            except Exception as exc:  # a verifier crash scores 0 but is logged, not hidden
                logger.warning("reward verification failed: %s", exc)
                out.append(0.0)
        return out

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
