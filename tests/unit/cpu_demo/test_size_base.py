"""benchmarks/size_base.py's per-level statistics, against counts worked by hand."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "size_base.py"
_spec = importlib.util.spec_from_file_location("size_base", _PATH)
size_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(size_base)


def _samples(pid, source, correct):
    return [{"id": pid, "source": source, "correct": c} for c in correct]


def test_per_level_counts_mixed_and_unsolved_groups():
    k = 4
    samples = (_samples("a", "one", [1, 1, 1, 1]) + _samples("b", "one", [1, 0, 0, 0])
               + _samples("c", "two", [0, 0, 0, 0]) + _samples("d", "two", [0, 1, 0, 1])
               + _samples("e", "two", [0, 0, 0, 0]))
    table = size_base.per_level(samples, k)
    # one: 5 of 8 right; b is mixed, a is not; none unsolved
    assert table["one"] == {"pass_rate": 5 / 8, "mixed": 0.5, "none": 0.0, "problems": 2}
    # two: 2 of 12 right; d mixed; c and e unsolved
    assert table["two"] == pytest.approx({"pass_rate": 2 / 12, "mixed": 1 / 3, "none": 2 / 3,
                                          "problems": 3})


def test_per_level_refuses_groups_of_another_size():
    with pytest.raises(SystemExit, match="groups of \\[3\\] samples, expected --k 4"):
        size_base.per_level(_samples("a", "one", [1, 0, 1]), 4)


def test_mix_is_parsed_and_bad_text_is_named():
    assert size_base.parse_mix("1:5,2:3,4:0.5") == {1: 5.0, 2: 3.0, 4: 0.5}
    with pytest.raises(SystemExit, match="--mix: expected level:value"):
        size_base.parse_mix("1-5")
    with pytest.raises(SystemExit, match="--mix: values must be >= 0"):
        size_base.parse_mix("1:-1")
    with pytest.raises(SystemExit, match="--mix: weights must be >= 0 and not all 0"):
        size_base.parse_mix("1:0")
    # the per-level shares answered without working: none is an empty flag
    assert size_base.parse_levels("2:0.4,3:0.4", "--direct") == {2: 0.4, 3: 0.4}
    assert size_base.parse_levels("", "--direct") == {}
    with pytest.raises(SystemExit, match="--direct: expected level:value"):
        size_base.parse_levels("0.4", "--direct")
