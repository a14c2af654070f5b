"""TRAPO loss on 2 gloo processes: fused vocab-parallel logprobs/entropy vs a full-vocabulary
log_softmax, and loss/gradient invariance to micro-batch, DP, TP (with and without sequence
parallel) and PP splits for every
aggregation mode (tests/distributed/workers/loss_suite.py)."""
import pytest

from launch import run_worker

AGGS = ["constant", "token_mean", "seq_mean_token_mean"]
# each vs TP=2 / 1 micro-batch; tp2sp = TP=2 with sequence parallel
# *_packed: sequences packed into rows with block-diagonal attention
LAYOUTS = ["tp2_mb4", "tp2sp_mb2", "dp2_mb1", "dp2_mb2", "pp2_mb4", "tp2_packed", "dp2_packed",
           "tp2sp_packed", "pp2_packed"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_worker("loss_suite.py", 2, tmp_path_factory.mktemp("loss"))


def test_vocab_parallel_logprobs_entropy_match_full_softmax(suite):
    assert suite["vp_logprob_diff"] <= 1e-5
    assert suite["vp_entropy_diff"] <= 1e-5
    assert suite["vp_grad_diff"] <= 1e-5
    assert suite["vp_ref_grad_max"] > 0.1  # the gradients compared are not trivially zero


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_grads_invariant_to_split(suite, agg, layout):
    assert suite[f"{agg}:tokens"] == [27.0, 56.0]  # mixed TrSFT and policy-gradient tokens
    assert suite[f"{agg}:ref_loss"] != 0 and suite[f"{agg}:grad_scale"] > 0
    assert not suite[f"{agg}:{layout}:grad_nan"]
    assert suite[f"{agg}:{layout}:loss_rel"] <= 1e-5
    assert suite[f"{agg}:{layout}:grad_rel"] <= 1e-5


def test_aggregation_modes_differ(suite):
    losses = [suite[f"{agg}:ref_loss"] for agg in AGGS]
    assert len({round(v, 9) for v in losses}) == 3
