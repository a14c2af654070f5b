"""The entropy bonus's token weights (fidelity review D6), worked by hand: the reference
takes masked_mean(entropy, response_mask) — every response token, expert prefixes included —
where this project took the generated tokens only, weighted like the loss."""
import pytest
import torch

from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.config import LossConfig
from megatron_trapo.train.batch import build_sequences


def _traj(prefix, train_prefix, completion):
    return Trajectory(prompt_index=0, prompt_ids=[1, 2, 3], prefix_ids=[4] * prefix,
                      completion_ids=[5] * completion, rollout_logprobs=[0.0] * completion,
                      train_prefix=train_prefix, guided=prefix > 0)


# trained prefix 2 + generated 3; generated 2; context-only prefix 2 + generated 1:
# 10 response tokens, 8 loss tokens (5 + 2 + 1), 6 generated
TRAJS = [_traj(2, True, 3), _traj(0, False, 2), _traj(2, False, 1)]


def _entropy_term(seqs, entropy):
    """Σ e·H / N — what loss_func adds to the loss, times −coef."""
    n = sum(float(s["agg_norm"].sum()) for s in seqs)
    return sum(float((s["entropy_weight"] * entropy(s)).sum()) for s in seqs) / n


def _response(s):
    return (s["expert_mask"] + s["generated_mask"] > 0) | (s["labels"] == 4)


def test_response_mode_is_the_token_mean_over_every_response_token():
    for aggregation in ("token_mean", "constant", "seq_mean_token_mean"):
        seqs = build_sequences(TRAJS, LossConfig(aggregation=aggregation, max_response_length=16))
        # entropy 1 on every response token, 0 elsewhere: the mean over them is 1
        assert _entropy_term(seqs, lambda s: _response(s).float()) == pytest.approx(1.0)
        # the context-only prefix counts (entropy 1 there only: 2 of 10 tokens)
        context = lambda s: ((s["labels"] == 4) & (s["expert_mask"] == 0)).float()  # noqa: E731
        assert _entropy_term(seqs, context) == pytest.approx(2 / 10)
        # prompt tokens do not
        assert _entropy_term(seqs, lambda s: (~_response(s)).float()) == 0.0


def test_generated_mode_weights_the_generated_tokens_like_the_loss():
    seqs = build_sequences(TRAJS, LossConfig(aggregation="token_mean",
                                             entropy_tokens="generated"))
    # token_mean: N = 8 loss tokens, weight 1 on the 6 generated ones
    assert _entropy_term(seqs, lambda s: torch.ones_like(s["agg_norm"])) == pytest.approx(6 / 8)
    assert _entropy_term(seqs, lambda s: s["expert_mask"]) == 0.0


def test_the_references_choice_is_the_default():
    assert LossConfig().entropy_tokens == "response"
