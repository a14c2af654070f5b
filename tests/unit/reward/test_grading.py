"""Answer extraction and the two graders on real benchmark rows: each benchmark's ground truth,
written as a model writes a final answer, is graded correct; a wrong number is not."""
import re

import pytest

from megatron_trapo.eval import registry
from megatron_trapo.reward.grading import Grader, grade_response

BENCHMARKS = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gsm8k"]
ROWS_PER_BENCHMARK = 25


def as_model_writes(answer: str) -> str:
    return f"Let me think step by step.\nSo the final answer is $\\boxed{{{answer.strip()}}}$."


def plus_one(answer: str):
    """A wrong answer: the ground truth's number plus one (None if it is not a number)."""
    text = answer.strip().replace(",", "")
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        value = float(text) + 1
        return str(int(value)) if value.is_integer() else str(value)
    return None


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=10) as g:
        yield g


@pytest.mark.parametrize("name", BENCHMARKS)
def test_ground_truth_verifies_and_a_wrong_number_does_not(grader, name):
    problems = registry.get(name).load(limit=ROWS_PER_BENCHMARK)
    right = grader.grade([(as_model_writes(p.answer), p.answer) for p in problems])
    failed = [(p.index, p.answer, g) for p, g in zip(problems, right) if not g["correct"]]
    assert not failed, failed
    assert all(g["grader"] in ("math_verify", "prm800k") for g in right)
    wrong = [(p, plus_one(p.answer)) for p in problems if plus_one(p.answer) is not None]
    assert len(wrong) >= 5 or name in ("minerva", "olympiadbench")
    graded = grader.grade([(as_model_writes(w), p.answer) for p, w in wrong])
    assert not [(p.answer, w) for (p, w), g in zip(wrong, graded) if g["correct"]]
    assert all(g["grader"] == "both" for g in graded)  # both graders were asked, both said no


def test_equivalent_forms_are_accepted():
    math500 = registry.get("math500").load()
    # \dfrac for \frac, a tuple with \left( \right), an answer in words (math500 rows 2, 0, 4)
    assert grade_response("\\boxed{\\dfrac{14}{3}}", math500[2].answer)["correct"]
    assert grade_response("\\boxed{(3, \\frac{\\pi}{2})}", math500[0].answer)["correct"]
    assert grade_response("\\boxed{\\text{Evelyn}}", math500[4].answer)["correct"]
    gsm = registry.get("gsm8k").load(limit=1)[0]  # "18": dollars written by the model
    assert grade_response("She makes \\boxed{\\$18} every day.", gsm.answer)["correct"]


def test_second_grader_decides_when_math_verify_says_wrong():
    # a model that wraps its number in \text{}: math-verify parses it as text and says wrong,
    # PRM800K's grader strips \text{} and says right — recorded as decided by "prm800k"
    row = registry.get("math500").load()[44]
    assert row.answer == "1.25"
    g = grade_response("\\boxed{\\text{1.25}}", row.answer)
    assert g == {"extracted": "\\text{1.25}", "correct": True, "grader": "prm800k"}
    g = grade_response("\\boxed{\\text{1.26}}", row.answer)
    assert g["correct"] is False and g["grader"] == "both"


def test_extraction_takes_the_last_complete_box():
    assert grade_response("\\boxed{3} no, wait: \\boxed{18}", "18")["extracted"] == "18"
    assert grade_response("\\boxed{\\frac{1}{2}}", "0.5")["correct"]
    cut = grade_response("so \\boxed{\\frac{1}{", "0.5")  # the response ran out of tokens
    assert cut == {"extracted": None, "correct": False, "grader": "no_answer"}
    assert grade_response("The answer is 18.", "18")["grader"] == "no_answer"
    assert grade_response("\\boxed{ }", "18")["grader"] == "no_answer"


def _hang(response, ground_truth, timeout_s):
    import time

    time.sleep(30)


def test_a_grading_past_its_deadline_is_recorded_as_timeout(monkeypatch):
    import time

    from megatron_trapo.reward import grading

    monkeypatch.setattr(grading, "grade_response", _hang)
    with Grader(num_workers=1, timeout_s=1.0) as g:  # workers fork after the patch
        t0 = time.time()
        out = g.grade([("so \\boxed{18}", "18")])
        assert time.time() - t0 < 10 and g.timeouts == 1
    assert out == [{"extracted": "18", "correct": False, "grader": "timeout"}]
