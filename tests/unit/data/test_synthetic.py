"""The demo's task: every value stays in range, the expert solution computes the answer step by
step, the mixture's weights hold, and held-out problems never reach the training splits."""
import re
from collections import Counter

from megatron_trapo.data.synthetic import level_of, make_split


def _replay(problem: str) -> tuple:
    """The answer worked from the problem text alone, and every intermediate value."""
    value = int(re.match(r"Start with (\d+)\.", problem).group(1))
    values = [value]
    for word, operand in re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", problem):
        value = {"Add": value + int(operand), "Subtract": value - int(operand),
                 "Multiply by": value * int(operand)}[word]
        values.append(value)
    return value, values


def test_answers_and_solutions_follow_the_problem_and_stay_in_range():
    for r in make_split(500, 3, [1, 2, 3, 4, 5], "t", max_value=30):
        answer, values = _replay(r.problem)
        assert r.answer == str(answer)
        assert all(0 <= v <= 30 for v in values), (r.problem, values)
        steps = int(r.source.split("-")[1][0])
        assert len(values) == steps + 1
        assert level_of(r.source) == len(values) - 1  # the steps the problem text has
        lines = r.solutions[0].split("\n\n")
        assert len(lines) == steps + 1 and lines[-1] == f"The answer is \\boxed{{{answer}}}."
        assert [int(line.split("= ")[1].rstrip(".")) for line in lines[:-1]] == values[1:]


def test_a_source_that_names_no_difficulty_has_no_level():
    assert level_of("synthetic-12step") == 12
    for other in ("gsm8k", "synthetic-step", "synthetic-3steps", "xsynthetic-3step"):
        assert level_of(other) is None, other


def test_mixture_weights_and_held_out_exclusion():
    held_out = make_split(300, 0, [1, 2], "eval")
    texts = {r.problem for r in held_out}
    pre = make_split(3000, 0, {1: 3, 2: 1}, "pretrain", exclude=texts)
    counts = Counter(r.source for r in pre)
    assert set(counts) == {"synthetic-1step", "synthetic-2step"}
    assert 2.5 < counts["synthetic-1step"] / counts["synthetic-2step"] < 3.5
    assert not texts & {r.problem for r in pre}
    # without the exclusion, one-step problems repeat across splits (a few hundred exist)
    assert texts & {r.problem for r in make_split(3000, 0, {1: 3, 2: 1}, "pretrain")}


def _lines(solution: str) -> list:
    """(value, op, operand, written result) of each step line, either style."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in
            re.findall(r"(-?\d+) ([-+*]) (\d+) (?:=|gives) (-?\d+)\.", solution)]


def test_slipped_solutions_go_on_from_what_they_wrote_at_each_styles_rate():
    """A slip writes a step off by 1-2; the next step starts from the written value, the boxed
    answer is the last written value; the problem and its answer stay the true ones; each
    style slips at its own rate."""
    records = make_split(2000, 1, [1, 2, 3], "pretrain", max_value=30, slip=(0.05, 0.25))
    slipped, steps = [0, 0], [0, 0]
    for r in records:
        answer, values = _replay(r.problem)
        assert r.answer == str(answer)
        for style, solution in enumerate(r.solutions):
            lines = _lines(solution)
            assert len(lines) == len(values) - 1
            assert lines[0][0] == values[0]
            for (a, op, b, c), nxt in zip(lines, lines[1:] + [None]):
                true = {"+": a + b, "-": a - b, "*": a * b}[op]
                assert 1 <= abs(c - true) <= 2 or c == true
                slipped[style] += c != true
                steps[style] += 1
                if nxt is not None:
                    assert nxt[0] == c  # goes on from the written value
            assert solution.endswith(f"\\boxed{{{lines[-1][3]}}}.")
    # ~4000 steps per style: the bounds are 3 standard errors either side
    assert 0.040 < slipped[0] / steps[0] < 0.060, slipped[0] / steps[0]
    assert 0.23 < slipped[1] / steps[1] < 0.27, slipped[1] / steps[1]


def test_no_slip_writes_every_step_right_in_both_styles():
    clean = make_split(200, 2, [1, 2, 3], "t", max_value=30)
    for r in clean:
        _, values = _replay(r.problem)
        for solution in r.solutions:
            assert [line[3] for line in _lines(solution)] == values[1:]
    assert clean != make_split(200, 2, [1, 2, 3], "t", max_value=30, slip=(0.0, 0.5))
