"""The demo's splits: the held-out problems are in no training split, the base sees both
solution styles, the tuning probe is drawn apart from every split a method trains or is
evaluated on."""
import dataclasses

from megatron_trapo.cpu_demo.task import LEVELS, Sizes, prepare
from megatron_trapo.data.records import load_records


def test_prepare_keeps_held_out_problems_out_and_shows_both_styles(tmp_path):
    sizes = Sizes(pretrain=300, train=120, eval=60, eval_extra={2: 10, 4: 5}, probe=20)
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
