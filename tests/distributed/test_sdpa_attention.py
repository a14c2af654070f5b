"""The local spec's SDPA core attention (``model.attention_backend=auto|sdpa``, the CPU
default) computes what megatron's unfused DotProductAttention computes, keeps packed sequences
apart without a mask, and agrees across TP=2 with sequence parallel
(tests/distributed/workers/sdpa_attention.py)."""
import pytest

from launch import run_worker
from workers.results import SdpaSuite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_worker("sdpa_attention.py", 2, tmp_path_factory.mktemp("sdpa"), result=SdpaSuite)


def test_sdpa_matches_megatrons_unfused_attention_on_packed_rows(suite):
    assert suite.same_weights
    assert suite.packed_vs_local_logits <= 1e-5
    assert suite.packed_vs_local_grads <= 1e-5 * max(1.0, suite.ref_grad_max)
    assert suite.ref_grad_max > 0.1
    assert suite.padded_vs_local_logits <= 1e-5


def test_packed_sequences_equal_each_sequence_alone(suite):
    # the reference's own packing is right, and ours equals it without any mask
    assert suite.local_packed_vs_alone_logits <= 1e-5
    assert suite.packed_vs_alone_logits <= 1e-5
    # attending the whole row as one sequence is far off: the check sees leaks across segments
    assert suite.leaky_vs_alone_logits > 1e-2


def test_sdpa_tp2_sequence_parallel_matches_tp1(suite):
    assert suite.tp2sp_packed_vs_tp1_logits <= 1e-5


def test_only_the_attentions_that_take_packed_rows_get_them(suite):
    assert suite.takes_packed == {"local": False, "auto": True}
