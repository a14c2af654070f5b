"""Math reward: last \\boxed{} answer, math-verify equivalence, and a hard deadline."""
import time

import pytest

from megatron_trapo.reward.math_reward import MathReward, last_boxed


def test_last_boxed_matches_braces():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"cut \boxed{\frac{1}{2") is None


@pytest.fixture(scope="module")
def reward():
    with MathReward(num_workers=2, timeout_s=4.0) as r:
        yield r


def test_equivalence_and_last_box(reward):
    pairs = [(r"so the answer is \boxed{0.5}", r"\frac{1}{2}"),
             (r"\boxed{3} wait, no: \boxed{4}", "4"),
             (r"\boxed{4} wait, no: \boxed{3}", "4"),
             ("The answer is 4.", "4"),  # no box, no reward (no format guessing)
             (r"\boxed{x^2+2x+1}", "(x+1)^2"),
             (r"\boxed{12}", "12")]
    assert reward.score(pairs) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_pathological_answer_scores_zero_without_hanging(reward):
    t0 = time.time()
    out = reward.score([(r"\boxed{10^{10^{10}}}", "7"), (r"\boxed{7}", "7")])
    assert out == [0.0, 1.0]
    assert time.time() - t0 < 10
