"""Grading one evaluation sample, as the paper does (docs/algorithm.md §5) — for
``megatron-trapo eval`` and for the trainer's held-out evaluation alike: the answer is the last
``\\boxed{…}`` of the response; math-verify judges it, and when math-verify says wrong a second,
independent grader is consulted — PRM800K's grader (Hendrycks-MATH normalisation + sympy over
pylatexenc, as packaged by ``mathruler``), which shares no parser with math-verify. The grader
that decided is recorded:

- ``math_verify``: math-verify said correct;
- ``prm800k``: math-verify said wrong, PRM800K's grader said correct;
- ``both``: both said wrong;
- ``no_answer``: the response has no (complete) ``\\boxed{}``;
- ``timeout`` / ``error``: grading was killed at the deadline or crashed (counted wrong).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from mathruler.grader import grade_answer

from megatron_trapo.reward.math_reward import VerifierPool, last_boxed, math_verify_equal


def second_grader_equal(answer: str, ground_truth: str) -> bool:
    """PRM800K's grader (via mathruler) on an extracted answer."""
    return bool(grade_answer(answer, ground_truth))


def grade_response(response: str, ground_truth: str, timeout_s: int = 3) -> dict:
    """``{"extracted", "correct", "grader"}`` of one response (runs in a pool worker)."""
    answer = last_boxed(response)
    if answer is None or not answer.strip():
        return {"extracted": answer, "correct": False, "grader": "no_answer"}
    if math_verify_equal(answer, ground_truth, timeout_s):
        return {"extracted": answer, "correct": True, "grader": "math_verify"}
    if second_grader_equal(answer, ground_truth):
        return {"extracted": answer, "correct": True, "grader": "prm800k"}
    return {"extracted": answer, "correct": False, "grader": "both"}


def grade_all(pool: VerifierPool, pairs: Sequence[Tuple[str, str]]) -> List[dict]:
    """:func:`grade_response` of every (response, ground truth) pair, in ``pool``'s workers with
    its hard deadline — any verifier pool serves (the trainer grades in its reward's pool)."""
    def failed(reason: str) -> dict:
        return {"extracted": None, "correct": False, "grader": reason.split(":")[0]}

    out = pool.map(grade_response, [(t, gt, pool.inner_timeout) for t, gt in pairs], failed)
    for (text, _), g in zip(pairs, out):  # a killed task still names what it was grading
        if g["extracted"] is None and g["grader"] in ("timeout", "error"):
            g["extracted"] = last_boxed(text)
    return out


class Grader(VerifierPool):
    """Grades batches of (response, ground truth) in worker processes with a hard deadline."""

    def grade(self, pairs: Sequence[Tuple[str, str]]) -> List[dict]:
        return grade_all(self, pairs)
