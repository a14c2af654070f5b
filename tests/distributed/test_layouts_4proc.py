"""Four gloo processes: a TP=2 x PP=2 run (sequence parallel, distributed optimizer) saved and
continued at TP=1/PP=1, TP=1/PP=4 and TP=2/PP=1 behaves exactly like continuing it in place."""
import pytest

from launch import run_worker
from workers.results import Layouts4Proc

TARGETS = ["tp1pp1", "tp1pp4", "tp2pp1"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_worker("layouts_4proc.py", 4, tmp_path_factory.mktemp("layouts4"),
                      result=Layouts4Proc)


def test_tp2pp2_trains(suite):
    losses = suite.tp2pp2_losses
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("target", TARGETS)
def test_checkpoint_logits_identical_at_other_layouts(suite, target):
    assert suite.targets[target].logits <= 1e-5


@pytest.mark.parametrize("target", TARGETS)
def test_optimizer_state_reshards_and_training_continues(suite, target):
    got = suite.targets[target]
    assert got.next == pytest.approx(suite.tp2pp2_next, abs=1e-5)
    assert got.loss_after == pytest.approx(suite.tp2pp2_loss_after, abs=1e-5)
