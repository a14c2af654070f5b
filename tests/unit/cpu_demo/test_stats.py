"""The demo's paired comparison, against sums worked by hand."""
import json
import math

import pytest

from megatron_trapo.cpu_demo.stats import (final_rows, gain_over, paired, read_final_eval,
                                          right_length_share, sign_test, worked_share)
from megatron_trapo.data.synthetic import steps_written


def test_sign_test_by_hand():
    # 8 wins, 2 losses: P(X <= 2) for Binomial(10, 1/2) = (1 + 10 + 45) / 1024, two-sided x2
    assert sign_test(8, 2) == pytest.approx(2 * 56 / 1024)
    assert sign_test(2, 8) == sign_test(8, 2)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(20, 0) == pytest.approx(2 / 2 ** 20)


def test_paired_difference_counts_and_interval():
    a = [{"p1": 1.0, "p2": 1.0, "p3": 0.0, "p4": 1.0}, {"p1": 1.0, "p2": 0.0, "p3": 1.0, "p4": 1.0}]
    b = [{"p1": 0.0, "p2": 1.0, "p3": 0.0, "p4": 0.0}, {"p1": 1.0, "p2": 0.0, "p3": 0.0, "p4": 0.0}]
    r = paired(a, b, reps=4000)
    # differences: seed 1 (+1, 0, 0, +1), seed 2 (0, 0, +1, +1): mean 4/8
    assert r.diff == pytest.approx(0.5)
    assert (r.wins, r.losses) == (4, 0)
    assert r.sign_p == pytest.approx(2 / 16)
    assert r.low <= r.diff <= r.high and r.low >= 0.0 and r.high <= 1.0
    # the interval narrows with more problems of the same pattern
    wide = r.high - r.low
    a10 = [{f"{k}{i}": v for k, v in run.items() for i in range(10)} for run in a]
    b10 = [{f"{k}{i}": v for k, v in run.items() for i in range(10)} for run in b]
    assert paired(a10, b10, reps=4000).high - paired(a10, b10, reps=4000).low < wide


def test_paired_with_strata_weighs_each_source_the_same():
    """eval.average=sources: the difference is the mean of the sources' differences (here a
    source of 1 problem and one of 3), and the bootstrap keeps each source's problems apart."""
    a = [{"x1": 1.0, "y1": 0.0, "y2": 0.0, "y3": 1.0}, {"x1": 1.0, "y1": 0.0, "y2": 1.0, "y3": 1.0}]
    b = [{"x1": 0.0, "y1": 0.0, "y2": 0.0, "y3": 0.0}, {"x1": 0.0, "y1": 1.0, "y2": 0.0, "y3": 1.0}]
    strata = {"x1": "x", "y1": "y", "y2": "y", "y3": "y"}
    r = paired(a, b, reps=3000, strata=strata)
    # x: (+1, +1) -> 1; y: seed 1 (0, 0, +1), seed 2 (-1, +1, 0) -> 1/6; mean (1 + 1/6) / 2
    assert r.diff == pytest.approx(7 / 12)
    assert paired(a, b).diff == pytest.approx(3 / 8)  # over problems: (2 + 1) / 8
    assert (r.wins, r.losses) == (4, 1)
    # x's one problem differs by +1 on both seeds: every resample is (1 + y's mean) / 2 >= 0
    assert 0.0 <= r.low <= r.diff <= r.high <= 1.0
    with pytest.raises(ValueError, match="no source for problems"):
        paired(a, b, strata={"x1": "x"})


def test_paired_refuses_mismatched_seeds():
    with pytest.raises(ValueError, match="same seeds"):
        paired([{"p": 1.0}], [{"p": 1.0}, {"p": 0.0}])


def test_final_eval_is_the_last_step(tmp_path):
    path = tmp_path / "eval_samples.jsonl"
    path.write_text('{"step": 0, "id": "a", "correct": 0.0}\n{"step": 5, "id": "a", "correct": 1.0}\n'
                    '{"step": 5, "id": "b", "correct": 0.0}\n')
    assert read_final_eval(final_rows(path)) == {"a": 1.0, "b": 0.0}
    assert math.isclose(sum(read_final_eval(final_rows(path)).values()), 1.0)


def test_final_eval_averages_a_problems_samples(tmp_path):
    """eval.k samples per problem: the problem's score is the share correct (avg@k)."""
    path = tmp_path / "eval_samples.jsonl"
    rows = [(0, "a", 0.0)] * 4 + [(5, "a", 1.0), (5, "a", 0.0), (5, "a", 1.0), (5, "a", 1.0),
                                  (5, "b", 0.0), (5, "b", 1.0), (5, "b", 0.0), (5, "b", 0.0)]
    path.write_text("".join(f'{{"step": {s}, "id": "{i}", "correct": {c}}}\n' for s, i, c in rows))
    assert read_final_eval(final_rows(path)) == {"a": 0.75, "b": 0.25}


def test_right_length_share_counts_step_lines_of_either_style(tmp_path):
    assert steps_written("8 + 5 = 13.\n\n13 - 2 = 11.\n\nThe answer is \\boxed{11}.") == 2
    assert steps_written("We go step by step.\n\nNow 3 - 5 gives -2.\n\nSo \\boxed{-2}.") == 1
    assert steps_written("The answer is \\boxed{4}.") == 0
    two, three = "1 + 1 = 2.\n\n2 + 1 = 3.", "1 + 1 = 2.\n\n2 + 1 = 3.\n\n3 + 1 = 4."
    rows = [(0, "a", three), (4, "a", two), (4, "a", three), (4, "b", three), (4, "c", two)]
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "id": i, "correct": 0.0, "text": t}) + "\n"
                            for s, i, t in rows))
    sources = {"a": "synthetic-2step", "b": "synthetic-3step", "c": "synthetic-3step"}
    assert right_length_share(final_rows(path), sources) == {"synthetic-2step": 0.5, "synthetic-3step": 0.5}


def test_worked_share_counts_answers_with_any_step_line(tmp_path):
    rows = [(4, "a", "The answer is \\boxed{4}."), (4, "a", "1 + 1 = 2.\n\nThe answer is 2."),
            (4, "b", "We go step by step.\n\nNow 3 - 1 gives 2.\n\nSo \\boxed{2}."),
            (4, "c", "The answer is \\boxed{7}."), (0, "c", "2 + 2 = 4.")]  # step 0: not last
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "id": i, "correct": 0.0, "text": t}) + "\n"
                            for s, i, t in rows))
    sources = {"a": "synthetic-2step", "b": "synthetic-3step", "c": "synthetic-3step"}
    assert worked_share(final_rows(path), sources) == {"synthetic-2step": 0.5, "synthetic-3step": 0.5}


def test_gain_over_the_base_in_seed_stds():
    # seeds 0.62, 0.64, 0.66 over a base of 0.60: mean gain 0.04, sample std 0.02, 2 stds
    gain, std, ratio = gain_over(0.60, [0.62, 0.64, 0.66])
    assert (gain, std, ratio) == pytest.approx((0.04, 0.02, 2.0))
    assert gain_over(0.60, [0.55, 0.57, 0.59])[2] == pytest.approx(-1.5)  # mean 0.57
    assert gain_over(0.60, [0.70]) == pytest.approx((0.10, 0.0, 0.0))  # one seed: no ratio
    assert gain_over(0.60, [0.65, 0.65])[2] == math.inf
