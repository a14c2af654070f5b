"""Binary math reward: 1 if the answer of prefix + completion is equivalent to the ground truth
under math-verify, else 0 (docs/algorithm.md §3; no format reward). The answer is what
math-verify parses from the whole response (the reference's) or the last ``\\boxed{…}``
(``reward.extraction``).

math-verify's own timeouts use signals, which only work in a process's main thread, and a
pathological answer (``\\boxed{10^{10^{10}}}``) can take seconds or hang in sympy. So answers are
verified in a pebble process pool: each task runs in a worker's main thread with math-verify's
timeout, and a hard per-answer deadline kills a stuck worker (pebble replaces it) and scores 0.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.spawn
import os
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, List, Optional, Sequence, Tuple

from math_verify import parse, verify
from pebble import ProcessPool

from megatron_trapo.reward.verifier_server import TRAINER_MAIN_ENV

logger = logging.getLogger(__name__)

_FORKSERVER = multiprocessing.get_context("forkserver")
# the forkserver leaves the trainer's session (verifier_server), then imports this module
# (math-verify and sympy) once; each worker is forked from it
_FORKSERVER.set_forkserver_preload(["megatron_trapo.reward.verifier_server", __name__])


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


def _verify_text(text: str, ground_truth: str, timeout_s: int) -> bool:
    """math-verify's judgement of what it parses from ``text`` against the ground truth."""
    if not text.strip():
        return False
    gold = parse(_as_latex(ground_truth), parsing_timeout=timeout_s)
    pred = parse(text, parsing_timeout=timeout_s)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_s))


def math_verify_equal(answer: str, ground_truth: str, timeout_s: int = 3) -> bool:
    """math-verify's judgement of an extracted answer against the ground truth."""
    return bool(answer.strip()) and _verify_text(_as_latex(answer), ground_truth, timeout_s)


def verify_answer(response: str, ground_truth: str, timeout_s: int = 3,
                  extraction: str = "whole_response") -> float:
    """The reward of one response (runs in a pool worker's main thread). ``whole_response``
    (the reference's): math-verify parses the whole response — a box where there is one, else
    its last answer-like expression ("so the answer is 5."); two boxes parse as a set, which
    no single answer equals. ``last_boxed``: the last balanced ``\\boxed{}``/``\\fbox{}``
    or nothing."""
    if extraction == "last_boxed":
        boxed = last_boxed(response)
        return float(boxed is not None and math_verify_equal(boxed, ground_truth, timeout_s))
    return float(_verify_text(response, ground_truth, timeout_s))


def _own_session() -> None:
    """Pool workers leave the trainer's process group: a signal to the group (torchrun passing
    SIGTERM on, ``kill -- -PGID``) is for the trainer, which finishes its step and needs its
    verifiers for that. Pebble still stops a worker by its pid, and an idle worker exits when
    its parent's pipe closes."""
    os.setsid()


def _name_our_main_for_the_forkserver() -> None:
    """Tell the forkserver (started with this environment at the first worker) which main
    module its workers would otherwise import again (``verifier_server``, point 2). Set on every
    pool, not once: a child process inherits its parent's value and must replace it."""
    prep = multiprocessing.spawn.get_preparation_data("verifier")
    os.environ[TRAINER_MAIN_ENV] = json.dumps({"name": prep.get("init_main_from_name"),
                                               "path": prep.get("init_main_from_path")})


class VerifierPool:
    """A pool of verifier processes with a hard deadline per task (used by the reward and by
    the evaluation graders). A pool broken from outside (a worker killed by someone else) is
    replaced once per call."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.pool = self._new_pool()
        self.timeouts = 0  # tasks killed at the hard deadline (metric)
        # start the forkserver and its workers now (~2 s of imports), while the caller goes on
        # building the model, rather than inside the first step's reward phase
        self.pool.schedule(math_verify_equal, args=("1", "1"), timeout=60.0)

    def _new_pool(self):
        # forkserver, not fork: a worker forked from a trainer holds on to the trainer's pages
        # as they were (every page the trainer writes afterwards is copied — a second model,
        # optimizer and allocator heap per worker); a forkserver worker starts small, from a
        # process that has imported only the verifier
        _name_our_main_for_the_forkserver()
        return ProcessPool(max_workers=self.num_workers, initializer=_own_session,
                           context=_FORKSERVER)

    def _schedule(self, fn: Callable, args: Sequence[tuple]) -> list:
        try:
            return [self.pool.schedule(fn, args=a, timeout=self.timeout_s) for a in args]
        except RuntimeError as exc:  # pebble: "Unexpected error within the Pool"
            logger.warning("verifier pool broken (%s): starting a new one", exc)
            try:
                self.pool.stop()
            except Exception:  # already broken; nothing more to stop
                pass
            self.pool = self._new_pool()
            return [self.pool.schedule(fn, args=a, timeout=self.timeout_s) for a in args]

    @property
    def inner_timeout(self) -> int:
        """The timeout handed to math-verify itself, one second inside the hard deadline."""
        return max(1, int(self.timeout_s) - 1)

    def map(self, fn: Callable, args: Sequence[tuple], on_failure: Callable[[str], Any]) -> list:
        """``fn(*a)`` for each ``a`` in order; a task past the deadline or crashed gives
        ``on_failure(reason)`` (and is logged, not hidden)."""
        futures = self._schedule(fn, args)
        out = []
        for fut in futures:
            try:
                out.append(fut.result())
            except FutureTimeout:
                self.timeouts += 1
                out.append(on_failure("timeout"))
            except Exception as exc:
                logger.warning("verification failed: %s", exc)
                out.append(on_failure(f"error: {exc}"))
        return out

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MathReward(VerifierPool):
    """The binary reward of (response, ground truth) pairs (``extraction``: see
    :func:`verify_answer`; ``reward.extraction``)."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
                 extraction: str = "whole_response"):
        super().__init__(num_workers, timeout_s)
        self.extraction = extraction

    def score(self, pairs: Sequence[Tuple[str, str]]) -> List[float]:
        """Rewards of (response text, ground truth) pairs, in order (0 on timeout or crash)."""
        args = [(t, gt, self.inner_timeout, self.extraction) for t, gt in pairs]
        return [float(r) for r in self.map(verify_answer, args, lambda _: 0.0)]
