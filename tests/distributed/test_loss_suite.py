"""TRAPO loss on 2 gloo processes: fused vocab-parallel logprobs/entropy vs a full-vocabulary
log_softmax, and loss/gradient invariance to micro-batch, DP, TP (with and without sequence
parallel) and PP splits for every
aggregation mode (tests/distributed/workers/loss_suite.py). The reference layout runs
megatron's output layer and the loss on its logits; every other layout the fused output layer
(``loss.fused_output_layer``), so each split case also checks the fusion."""
import pytest

from launch import run_worker
from workers.results import LossSuite

AGGS = ["constant", "token_mean", "seq_mean_token_mean"]
# each vs TP=2 / 1 micro-batch (unfused); tp2sp = TP=2 with sequence parallel
# *_packed: sequences packed into rows with block-diagonal attention
LAYOUTS = ["tp2_mb4", "tp2sp_mb2", "dp2_mb1", "dp2_mb2", "pp2_mb4", "tp2_packed", "dp2_packed",
           "tp2sp_packed", "pp2_packed"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_worker("loss_suite.py", 2, tmp_path_factory.mktemp("loss"), result=LossSuite)


def test_vocab_parallel_logprobs_entropy_match_full_softmax(suite):
    vp = suite.vocab_parallel
    assert vp.logprob_diff <= 1e-5
    assert vp.entropy_diff <= 1e-5
    assert vp.grad_diff <= 1e-5
    assert vp.ref_grad_max > 0.1  # the gradients compared are not trivially zero


def test_fused_output_layer_matches_full_softmax_of_hidden_times_weight(suite):
    """log p, entropy and both gradients (hidden states, this rank's weight rows) of the fused
    path, chunked and vocab-parallel, against float64 autograd through the full logits."""
    vp = suite.vocab_parallel
    assert len(vp.fused_diffs) == 4 and max(vp.fused_diffs) <= 2e-5, vp.fused_diffs
    assert vp.fused_ref_grad_max > 0.1


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_grads_invariant_to_split(suite, agg, layout):
    case, split = suite.aggregations[agg], suite.aggregations[agg].splits[layout]
    assert [case.expert_tokens, case.pg_tokens] == [27.0, 56.0]  # mixed TrSFT and PG tokens
    assert case.ref_loss != 0 and case.grad_scale > 0
    assert not split.grad_nan
    assert split.loss_rel <= 1e-5
    assert split.grad_rel <= 1e-5


def test_aggregation_modes_differ(suite):
    losses = [suite.aggregations[agg].ref_loss for agg in AGGS]
    assert len({round(v, 9) for v in losses}) == 3
