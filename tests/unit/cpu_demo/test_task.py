"""The demo's splits: the held-out problems are in no training split, the base sees both
solution styles, the tuning probe is drawn apart from every split a method trains or is
evaluated on."""
import dataclasses

import pytest

from megatron_trapo.cpu_demo.task import LEVELS, Sizes, prepare
from megatron_trapo.data.records import load_records


def test_prepare_keeps_held_out_problems_out_and_shows_both_styles(tmp_path):
    sizes = Sizes(pretrain=300, train=120, eval=60, eval_extra={2: 10, 4: 5}, probe=20,
                  pretrain_direct={})  # every solution worked (answers alone: next test)
    prepare(tmp_path, sizes)
    pre, train, probe, held = (load_records(tmp_path / f"{n}.jsonl")
                               for n in ("pretrain", "train", "tune_probe", "eval"))
    assert (len(pre), len(train), len(probe), len(held)) == (300, 120, 20, 75)
    extra = [r for r in held if r.id.startswith("eval-extra")]
    assert [r.source for r in extra] == ["synthetic-2step"] * 10 + ["synthetic-4step"] * 5
    assert len({r.problem for r in extra}) == 15 and len({r.id for r in held}) == 75
    # the extra held-out problems leave the training splits as they were without them
    plain = tmp_path / "plain"
    prepare(plain, dataclasses.replace(sizes, eval_extra={}))
    assert [r.problem for r in load_records(plain / "pretrain.jsonl")] == [r.problem for r in pre]
    assert [r.problem for r in load_records(plain / "train.jsonl")] == [r.problem for r in train]
    held_out = {r.problem for r in held}
    assert not held_out & {r.problem for r in pre + train}
    # the tuning probe: problems of the training distribution that no method trains on and
    # none is evaluated on (the first training problems, as it was, are partly trained on)
    assert not {r.problem for r in probe} & {r.problem for r in train + held}
    assert all(r.id.startswith("probe-") for r in probe)
    assert {r.source for r in probe} == {f"synthetic-{k}step" for k in LEVELS[1:]}
    assert {r.source for r in held} == {f"synthetic-{k}step" for k in LEVELS}
    # pretraining never shows the levels the mixture leaves out
    assert {r.source for r in pre} == {f"synthetic-{k}step" for k in sizes.pretrain_mix}
    # SFT trains the first solution: half the base's problems lead with the second style
    step_by_step = sum(r.solutions[0].startswith("We go step by step") for r in pre)
    assert step_by_step == 150
    assert not any(r.solutions[0].startswith("We go") for r in train)  # methods: as made
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_the_base_answers_a_share_of_the_middle_levels_without_working_and_the_methods_never_do(
        tmp_path):
    sizes = Sizes(pretrain=600, train=120, eval=60, eval_extra={}, probe=20,
                  pretrain_direct={2: 0.4, 3: 0.4})
    prepare(tmp_path, sizes)
    pre = load_records(tmp_path / "pretrain.jsonl")
    direct = [r for r in pre if r.solutions[0].startswith("The answer is")]
    for level in (2, 3):  # a seeded draw of 40% of each (about 170 and 115 problems)
        of_level = [r for r in pre if r.source == f"synthetic-{level}step"]
        share = sum(r in direct for r in of_level) / len(of_level)
        assert 0.3 < share < 0.5, (level, share)
    # one-step and four-step problems are always worked
    assert {r.source for r in direct} == {"synthetic-2step", "synthetic-3step"}
    for r in direct:  # the answer alone, right, in the words the terse style ends with
        assert r.solutions[0] == f"The answer is \\boxed{{{r.answer}}}."
        assert r.solutions[1].count("\n\n") >= 1  # the other solution keeps its working
    # the methods' expert solutions and the held-out answers keep every step
    for name in ("train", "eval", "tune_probe"):
        assert not any(s.startswith("The answer is") for r in load_records(
            tmp_path / f"{name}.jsonl") for s in r.solutions)
    # a level's share moving leaves the other levels' draws as they were
    other = tmp_path / "other"
    prepare(other, dataclasses.replace(sizes, pretrain_direct={2: 0.4, 3: 0.9}))
    moved = load_records(other / "pretrain.jsonl")
    assert ([r.solutions for r in moved if r.source != "synthetic-3step"]
            == [r.solutions for r in pre if r.source != "synthetic-3step"])
    assert (sum(r.solutions[0].startswith("The answer") for r in moved
                if r.source == "synthetic-3step")
            > sum(r in direct and r.source == "synthetic-3step" for r in pre))


@pytest.mark.parametrize("direct", [{2: 1.5}, {7: 0.2}])
def test_a_share_of_answers_alone_outside_0_1_or_of_no_level_is_refused_by_name(tmp_path, direct):
    with pytest.raises(ValueError, match="Sizes.pretrain_direct"):
        prepare(tmp_path, Sizes(pretrain=50, train=20, eval=20, eval_extra={}, probe=5,
                                pretrain_direct=direct))


def test_a_folder_made_with_other_sizes_is_made_again(tmp_path):
    sizes = Sizes(pretrain=200, train=60, eval=40, eval_extra={}, probe=10)
    prepare(tmp_path, sizes)
    first = (tmp_path / "pretrain.jsonl").read_text()
    prepare(tmp_path, sizes)  # the same sizes: kept as made
    assert (tmp_path / "pretrain.jsonl").read_text() == first
    prepare(tmp_path, dataclasses.replace(sizes, pretrain_direct={2: 0.5}))
    remade = load_records(tmp_path / "pretrain.jsonl")
    assert any(r.solutions[0].startswith("The answer is") for r in remade)
