"""The suites' typed results read back strictly: a field the worker forgot, one the test does not
know, or a wrong type fails at the read with its path — not later as a KeyError in one test."""
import dataclasses
import json

import pytest
from workers.results import LayoutTarget, Layouts4Proc, from_json, to_json


def sample() -> Layouts4Proc:
    return Layouts4Proc(tp2pp2_losses=[3.0, 2.5, 2.0], tp2pp2_next=[1.9, 1.8],
                        tp2pp2_loss_after=1.7,
                        targets={"tp1pp4": LayoutTarget(logits=1e-7, next=[1.9, 1.8],
                                                        loss_after=1.7)})


def test_round_trip_gives_the_same_typed_result():
    back = from_json(Layouts4Proc, to_json(sample()))
    assert back == sample() and isinstance(back.targets["tp1pp4"], LayoutTarget)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["targets"]["tp1pp4"].pop("loss_after"),
     r"Layouts4Proc.targets\['tp1pp4'\]: unknown fields \[\], missing fields \['loss_after'\]"),
    (lambda d: d.update(tp2pp2_extra=1), r"unknown fields \['tp2pp2_extra'\]"),
    (lambda d: d["targets"]["tp1pp4"].update(logits="small"),
     r"Layouts4Proc.targets\['tp1pp4'\].logits: expected float"),
])
def test_a_wrong_result_fails_at_the_read_naming_the_field(edit, message):
    data = dataclasses.asdict(sample())
    edit(data)
    with pytest.raises(TypeError, match=message):
        from_json(Layouts4Proc, json.dumps(data))
