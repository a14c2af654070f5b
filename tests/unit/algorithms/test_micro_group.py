"""The micro-group schedule against hand-worked reward sequences."""
import pytest

from megatron_trapo.algorithms.micro_group import (MicroGroupConfig, cut_prefix, is_guided,
                                                   plan_group)
from megatron_trapo.config import ConfigError

CFG = MicroGroupConfig()


def summary(plan):
    return [(p.level, p.guided, p.prefix_ratio, p.train_prefix, p.trace) for p in plan]


def test_no_guidance_when_first_four_succeed():
    plan = plan_group(CFG, [1, 1, 1, 1, 1, 1, 1, 1], num_traces=2)
    assert len(plan) == 8 and not any(p.guided for p in plan)


def test_all_failing_prompt_gets_every_level():
    plan = plan_group(CFG, [0] * 8, num_traces=2)
    assert summary(plan) == [
        (0, False, 0.0, False, 0)] * 4 + [
        (1, True, 0.25, False, 0), (1, True, 0.25, True, 0),   # mask [0, 1] at L = 0.25
        (2, True, 0.5, True, 0),
        (3, True, 1.0, True, 1)]                                # second trace, full solution
    assert plan[-1].full_solution and not plan[4].full_solution


@pytest.mark.parametrize("rewards, guided_levels", [
    ([1, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3]),  # 1 of 4 < 2: guided; 1 of 6 < 4; 1 of 7 < 7
    ([1, 1, 0, 0, 0, 0, 0, 0], [2, 3]),     # 2 of 4 is not < 2; 2 of 6 < 4
    ([1, 1, 0, 0, 1, 1, 0, 0], [3]),        # 4 of 6 is not < 4; 4 of 7 < 7
    ([1, 1, 1, 1, 1, 1, 1, 0], []),         # 7 of 7 is not < 7: no level guided
    ([1, 1, 1, 1, 1, 1, 0, 0], [3]),        # 6 of 7 < 7
])
def test_each_level_at_its_count_threshold(rewards, guided_levels):
    plan = plan_group(CFG, rewards)
    assert sorted({p.level for p in plan if p.guided}) == guided_levels


def test_mean_thresholds_differ_from_counts_at_level_two():
    # 4 of 6 correct: mean 0.667 < 0.7 → guided by the paper's mean rule, not by counts.
    assert is_guided(MicroGroupConfig(threshold_mode="mean"), 2, [1, 1, 0, 0, 1, 1])
    assert not is_guided(CFG, 2, [1, 1, 0, 0, 1, 1])


def test_no_trace_means_no_guidance():
    assert not any(p.guided for p in plan_group(CFG, [0] * 8, num_traces=0))


def test_prefix_cut_snaps_to_paragraph():
    texts = ["a"] * 20  # with its EOS the reference measures 21 tokens
    assert cut_prefix(texts, 0.25) == 5     # int(0.25 · 21)
    texts[7] = ".\n\n"
    assert cut_prefix(texts, 0.25) == 8     # 7 < (0.25 + 0.3)·21 = 11.55: cut just after it
    texts[7], texts[12] = "a", "\n\n"
    assert cut_prefix(texts, 0.25) == 5     # 12 ≥ 11.55: too far, plain cut
    texts[12], texts[11] = "a", "\n\n"
    assert cut_prefix(texts, 0.25) == 12    # 11 < 11.55 (without the EOS: 11 ≥ 11, no snap)
    assert cut_prefix(texts, 1.0) == 20


def test_prefix_cut_is_the_references_worked_case():
    """Fidelity review D9: 100 tokens, "\n\n" at index 25, ratio 0.25. The reference's
    get_prefix_end_idx measures 101 (with EOS), int(25.25) = 25, and wants a "\n\n" strictly
    after 25: none, so the cut is 25 (this project cut at 26 before)."""
    texts = ["a"] * 100
    texts[25] = "\n\n"
    assert cut_prefix(texts, 0.25) == 25
    texts[26] = "\n\n"  # strictly after: snapped to just past it
    assert cut_prefix(texts, 0.25) == 27


def test_config_validation():
    with pytest.raises(ConfigError, match="sft_flags\\[1\\] has 1 flags for a budget of 2"):
        MicroGroupConfig(sft_flags=[[0, 0, 0, 0], [1], [1], [1]])
    with pytest.raises(ConfigError, match="prefix_ratios has 3 entries"):
        MicroGroupConfig(prefix_ratios=[0, 0.5, 1.0])
