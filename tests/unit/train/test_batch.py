"""Per-token masks follow the sampler's decisions; weights are split-invariant."""
import torch

from megatron_trapo.algorithms.micro_group import MicroGroupConfig, plan_group
from megatron_trapo.algorithms.trajectory import Trajectory, assign_advantages
from megatron_trapo.config import LossConfig
from megatron_trapo.train.batch import build_sequences, make_microbatches, split_for_rank


def group_from_plan(rewards):
    plan = plan_group(MicroGroupConfig(), rewards, num_traces=2)
    trajs = []
    for p, r in zip(plan, rewards):
        prefix = [50, 51, 52, 53][: {0.0: 0, 0.25: 1, 0.5: 2, 1.0: 4}[p.prefix_ratio]]
        completion = [] if p.full_solution else [60, 61, 62]
        trajs.append(Trajectory(prompt_index=0, prompt_ids=[1, 2, 3], prefix_ids=prefix,
                                completion_ids=completion,
                                rollout_logprobs=[-0.5] * len(completion),
                                train_prefix=p.train_prefix, level=p.level, guided=p.guided,
                                reward=float(r)))
    return plan, trajs


def test_masks_match_sampler_decisions():
    plan, trajs = group_from_plan([0] * 8)
    assign_advantages(trajs, 8)
    seqs = build_sequences(trajs, LossConfig(aggregation="token_mean"))
    for p, t, s in zip(plan, trajs, seqs):
        n_prompt, n_prefix = len(t.prompt_ids), len(t.prefix_ids)
        exp = s["expert_mask"].tolist()
        gen = s["generated_mask"].tolist()
        # position k predicts token k+1: prefix tokens are labels at positions p-1 .. p+f-2
        want_exp = [1.0 if p.train_prefix and n_prompt - 1 <= k < n_prompt + n_prefix - 1 else 0.0
                    for k in range(len(exp))]
        assert exp == want_exp
        assert sum(gen) == len(t.completion_ids)
        assert all(e * g == 0 for e, g in zip(exp, gen))
        if p.full_solution:  # pure TrSFT sample: no generated tokens
            assert sum(gen) == 0 and sum(exp) == 4
        if not p.guided:
            assert sum(exp) == 0
    # the L = 0.25 pair shares its prefix but only the second trains on it
    assert seqs[4]["expert_mask"].sum() == 0 and seqs[5]["expert_mask"].sum() == 1
    # rollout logprobs sit exactly on generated positions
    assert torch.equal(seqs[0]["rollout_logprobs"] != 0, seqs[0]["generated_mask"].bool())


def test_microbatches_respect_token_budget_and_keep_every_sequence():
    _, trajs = group_from_plan([1, 0, 0, 0, 0, 0, 0, 0])
    seqs = build_sequences(trajs, LossConfig())
    mine = split_for_rank(seqs, 0, 2) + split_for_rank(seqs, 1, 2)
    assert sorted(int(s["sample_ids"][0]) for s in mine) == list(range(8))
    mbs = make_microbatches(seqs, max_tokens=16)
    assert all(mb["tokens"].numel() <= 16 for mb in mbs)
    total_norm = sum(float(mb["agg_norm"].sum()) for mb in mbs)
    assert abs(total_norm - sum(float(s["agg_norm"].sum()) for s in seqs)) < 1e-6
    fixed = make_microbatches(seqs, max_tokens=64, fixed_shape=(2, 10))
    assert all(tuple(mb["tokens"].shape) == (2, 10) for mb in fixed)


def test_packing_keeps_sequences_whole_and_apart():
    from megatron_trapo.train.batch import pack_microbatches, packed_attention

    _, trajs = group_from_plan([0] * 8)
    seqs = build_sequences(trajs, LossConfig())
    mbs = pack_microbatches(seqs, max_tokens=20)
    assert all(mb["tokens"].shape[0] == 1 and mb["tokens"].shape[1] <= 20 for mb in mbs)
    assert sum(int(mb["segment_ids"].max()) + 1 for mb in mbs) == 8
    assert sum(float(mb["generated_mask"].sum()) for mb in mbs) == sum(
        float(s["generated_mask"].sum()) for s in seqs)
    mb = max(mbs, key=lambda m: int(m["segment_ids"].max()))
    mask = packed_attention(mb, thd=False)["attention_mask"][0, 0]  # True = masked
    seg = mb["segment_ids"][0]
    i, j = int((seg == 1).nonzero()[0]), int((seg == 0).nonzero()[0])
    assert mask[i, j]  # a later sequence cannot see an earlier one
    assert not mask[j, j] and mask[j, j + 1]  # causal within a sequence
    assert mb["position_ids"][0, i] == 0  # positions restart per sequence


def test_packed_rows_are_aligned_and_padding_is_a_segment():
    from megatron_trapo.train import batch as B

    _, trajs = group_from_plan([0] * 8)
    seqs = build_sequences(trajs, LossConfig())
    for multiple in (1, 2, 16):
        for fixed in (False, True):
            mbs = B.pack_microbatches(seqs, max_tokens=32, multiple=multiple, fixed_width=fixed)
            widths = {mb["tokens"].shape[1] for mb in mbs}
            longest = max(int((mb["segment_ids"][0] >= 0).sum()) for mb in mbs)
            assert len(mbs) > 1
            if fixed:  # one shape for pipelines: the widest row's, not max_tokens
                assert widths == {-(-longest // multiple) * multiple}
                assert multiple > 1 or widths == {30}  # rows of 30 real tokens, not 32
            else:
                assert len(widths) > 1
            for mb in mbs:
                width = mb["tokens"].shape[1]
                assert width % multiple == 0 and width <= 32
                cu = mb["cu_seqlens"]
                assert cu.dtype == torch.int32 and int(cu[0]) == 0
                assert int(cu[-1]) == width  # every token, padding included, is in a segment
                real = int((mb["segment_ids"][0] >= 0).sum())
                lengths = (cu[1:] - cu[:-1]).tolist()
                assert sum(lengths[:int(mb["segment_ids"].max()) + 1]) == real
                assert mb["max_seqlen"] == max(lengths)
    # the THD path hands exactly these (device-resident) cu_seqlens to PackedSeqParams
    mb = B.pack_microbatches(seqs, max_tokens=32, multiple=16)[0]
    params = B.packed_attention(B.to_device(mb), thd=True)["packed_seq_params"]
    assert params.cu_seqlens_q is not None and params.cu_seqlens_q.dtype == torch.int32
    assert int(params.cu_seqlens_q[-1]) == mb["tokens"].shape[1]
    assert params.max_seqlen_q == mb["max_seqlen"]


def test_padded_microbatches_are_aligned():
    from megatron_trapo.train.batch import row_multiple

    _, trajs = group_from_plan([0] * 8)
    seqs = build_sequences(trajs, LossConfig())
    assert row_multiple(4, True) == 4 and row_multiple(4, False) == 1
    assert row_multiple(2, True, fp8=True) == 16 and row_multiple(2, True, cp=2) == 8
    assert row_multiple(4, True, fp8=True, cp=3) == 48
    for mb in make_microbatches(seqs, max_tokens=64, multiple=8):
        assert mb["tokens"].shape[1] % 8 == 0


def _luffy_group(free_rewards, expert_rewards):
    return [Trajectory(prompt_index=0, prompt_ids=[1], prefix_ids=[2] * guided, completion_ids=[3],
                       rollout_logprobs=[0.0], train_prefix=bool(guided), guided=bool(guided),
                       reward=float(r))
            for guided, rewards in ((0, free_rewards), (1, expert_rewards)) for r in rewards]


def test_on_policy_statistics_with_a_zero_std_count_it_as_one():
    """Fidelity review D3: 7 wrong free rollouts and a right expert sample gave the expert
    A = 1e6 (÷ (0 + 1e-6)); LUFFY's grpo_split counts std 0 as 1: A = 1 / (1 + 1e-6)."""
    trajs = _luffy_group([0] * 7, [1])
    assign_advantages(trajs, 8, normalize_std=True, on_policy_stats_only=True)
    assert [t.advantage for t in trajs[:7]] == [0.0] * 7
    assert abs(trajs[7].advantage - 1 / (1 + 1e-6)) < 1e-12


def test_a_lone_on_policy_sample_gives_mean_zero_and_std_one():
    trajs = _luffy_group([1], [0] * 6 + [1])
    for std in (False, True):
        assign_advantages(trajs, 8, normalize_std=std, on_policy_stats_only=True)
        want = [t.reward / (1 + 1e-6) if std else t.reward for t in trajs]
        assert [t.advantage for t in trajs] == want  # A = r − 0, ÷ (1 + eps) with std


def test_on_policy_statistics_with_a_spread_use_the_unbiased_std():
    trajs = _luffy_group([1, 0, 0, 1], [1] * 4)  # mean 0.5, unbiased std (1/3)**0.5
    assign_advantages(trajs, 8, normalize_std=True, on_policy_stats_only=True)
    sd = (1 / 3) ** 0.5
    assert [round(t.advantage, 9) for t in trajs] == \
        [round((r - 0.5) / (sd + 1e-6), 9) for r in (1, 0, 0, 1, 1, 1, 1, 1)]
