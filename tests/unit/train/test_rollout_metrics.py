"""Guidance statistics of a step: the share of each micro-group level's samples that were
guided (what the demo plots), worked by hand."""
import pytest

from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.train.step import rollout_metrics


def _t(level, guided, reward, prompt=0):
    return Trajectory(prompt_index=prompt, prompt_ids=[1], prefix_ids=[2] * guided,
                      completion_ids=[3, 4], rollout_logprobs=[0.0, 0.0], train_prefix=guided,
                      level=level, guided=guided, reward=reward)


def test_guided_share_per_level():
    # prompt A: 4 free (all wrong) then levels 1..3 guided; prompt B: 4 free (2 right),
    # levels 1 free, 2 free, 3 guided (say)
    trajs = ([_t(0, False, 0.0)] * 4 + [_t(1, True, 1.0)] * 2 + [_t(2, True, 1.0), _t(3, True, 1.0)]
             + [_t(0, False, 1.0)] * 2 + [_t(0, False, 0.0)] * 2 + [_t(1, False, 1.0)] * 2
             + [_t(2, False, 0.0), _t(3, True, 1.0)])
    m = rollout_metrics(trajs)
    assert m["rollout/guided_share/level1"] == pytest.approx(2 / 4)
    assert m["rollout/guided_share/level2"] == pytest.approx(1 / 2)
    assert m["rollout/guided_share/level3"] == pytest.approx(2 / 2)
    assert "rollout/guided_share/level0" not in m
    assert m["rollout/guided_fraction"] == pytest.approx(5 / 16)
    assert m["rollout/reward_unguided"] == pytest.approx(4 / 11)


def test_the_first_micro_group_reward_is_the_references_curve():
    """Fidelity review D11: later levels are free only where a prompt already did well, so
    the all-free mean leans high; the reference logs the first micro-group alone."""
    trajs = ([_t(0, False, 0.0)] * 4 + [_t(1, True, 1.0)] * 2 + [_t(2, True, 1.0), _t(3, True, 1.0)]
             + [_t(0, False, 1.0)] * 2 + [_t(0, False, 0.0)] * 2 + [_t(1, False, 1.0)] * 2
             + [_t(2, False, 1.0), _t(3, False, 1.0)])
    m = rollout_metrics(trajs)
    assert m["rollout/reward_first_micro_group"] == pytest.approx(2 / 8)
    assert m["rollout/reward_unguided"] == pytest.approx(6 / 12)
    # GRPO: one level of free rollouts, the two curves are one
    m = rollout_metrics([_t(0, False, 1.0)] * 3 + [_t(0, False, 0.0)])
    assert m["rollout/reward_first_micro_group"] == m["rollout/reward_unguided"] == 0.75


def test_grpo_has_no_guided_levels():
    m = rollout_metrics([_t(0, False, 1.0)] * 8)
    assert not [k for k in m if k.startswith("rollout/guided_share")]


def test_prompts_with_signal_counts_groups_that_disagree():
    # prompt 0 all wrong, prompt 1 mixed, prompt 2 all right (guided samples do not count:
    # prompt 0's guided right answer does not make its free rollouts disagree)
    trajs = ([_t(0, False, 0.0, 0)] * 4 + [_t(1, True, 1.0, 0)]
             + [_t(0, False, 1.0, 1), _t(0, False, 0.0, 1)] + [_t(0, False, 1.0, 2)] * 4)
    assert rollout_metrics(trajs)["rollout/prompts_with_signal"] == pytest.approx(1 / 3)


def test_free_reward_per_source():
    # prompts 0 and 2 are one-step problems, prompt 1 a five-step one; guided samples and
    # sources beyond the step's prompts do not count
    trajs = ([_t(0, False, 1.0, 0)] * 3 + [_t(0, False, 0.0, 0)] + [_t(0, False, 0.0, 1)] * 4
             + [_t(1, True, 1.0, 1)] + [_t(0, False, 1.0, 2)] * 4)
    m = rollout_metrics(trajs, ["synthetic-1step", "synthetic-5step", "synthetic-1step"])
    assert m["rollout/reward_unguided/synthetic-1step"] == pytest.approx(7 / 8)
    assert m["rollout/reward_unguided/synthetic-5step"] == 0.0
    assert m["rollout/reward_unguided"] == pytest.approx(7 / 12)
    assert not [k for k in rollout_metrics(trajs) if k.startswith("rollout/reward_unguided/")]
    many = [f"s{i}" for i in range(20)]  # a step of 20 sources logs none of them
    wide = [_t(0, False, 1.0, i) for i in range(20)]
    assert not [k for k in rollout_metrics(wide, many) if k.startswith("rollout/reward_unguided/")]
