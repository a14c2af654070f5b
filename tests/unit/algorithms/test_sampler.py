"""The sampler driven by a scripted fake engine (no processes), for every method: which
requests each level sends, what each prompt's group holds, which samples are scored. Expected
values are worked by hand from the paper's defaults (n = 4, 2, 1, 1; L = 0, .25, .5, 1; count
thresholds 0, 2, 4, 7; trace 1 for the last level)."""
import pytest

from megatron_trapo.algorithms.methods import METHODS
from megatron_trapo.algorithms.sampler import flatten, level_seed, sample_groups
from megatron_trapo.config import MicroGroupConfig
from megatron_trapo.data.items import PromptItem
from megatron_trapo.data.records import Record
from megatron_trapo.rollout.types import RolloutEngine, Sample, SamplingParams
from megatron_trapo.train.run import RolloutShare

EOS = 0
TRACE_A = [11, 12, 13, 14, 15, 16, 17, 18]  # 8 tokens, no "\n\n": cuts at 2 and 4
TRACE_B = [21, 22, 23]


class ScriptedEngine(RolloutEngine):
    """Answers each request's sample j with tokens [100 + request, j] and logprobs −0.5."""

    name = "scripted"

    def __init__(self):
        self.calls = []

    @property
    def weight_version(self):
        return "v7"

    def generate(self, requests):
        self.calls.append(list(requests))
        return [[Sample([100 + i, j], [-0.5, -0.5], "stop", "v7", len(r.prefix_ids))
                 for j in range(r.sampling.n)] for i, r in enumerate(requests)]


def items():
    texts = lambda ids: [f"t{t}" for t in ids]  # noqa: E731
    return [PromptItem(Record(f"problem {k}", "42", ["a", "b"]), [1, 2, 3 + k],
                       [TRACE_A, TRACE_B], [texts(TRACE_A), texts(TRACE_B)]) for k in range(2)]


def run(name, off_policy=1):
    """Prompt 0 always fails, prompt 1 always succeeds."""
    engine, scored = ScriptedEngine(), []

    def score(trajs):
        scored.append(list(trajs))
        for t in trajs:
            t.reward = float(t.prompt_index == 1)

    groups = sample_groups(items(), engine, score, METHODS[name], MicroGroupConfig(),
                           SamplingParams(temperature=1.0, max_new_tokens=64, stop_token_ids=[9]),
                           EOS, seed=5, off_policy=off_policy)
    return engine, scored, groups


@pytest.mark.parametrize("name", ["trapo", "trapo_plain_sft"])
def test_schedule_guides_only_the_failing_prompt(name):
    engine, scored, groups = run(name)
    assert [len(g) for g in groups] == [8, 8]
    # level 0: 4 free rollouts for both prompts, in one batch
    level0 = engine.calls[0]
    assert [(r.prompt_ids, r.prefix_ids, r.sampling.n) for r in level0] == \
        [([1, 2, 3], [], 4), ([1, 2, 4], [], 4)]
    assert [r.sampling.seed for r in level0] == [level_seed(5, 0, 0), level_seed(5, 1, 0)]
    assert level0[0].sampling.stop_token_ids == [9] and level0[0].sampling.max_new_tokens == 64
    # levels 1, 2: prompt 0 (0 correct) continues 25 % / 50 % of trace A; prompt 1 (4 correct
    # of 4, then 6 of 6) stays free; level 3: prompt 0 gets trace B whole, nothing generated
    assert [(r.prefix_ids, r.sampling.n) for r in engine.calls[1]] == [(TRACE_A[:2], 2), ([], 2)]
    assert [(r.prefix_ids, r.sampling.n) for r in engine.calls[2]] == [(TRACE_A[:4], 1), ([], 1)]
    assert [(r.prompt_ids, r.prefix_ids) for r in engine.calls[3]] == [([1, 2, 4], [])]
    assert len(engine.calls) == 4
    failing, passing = groups
    assert [t.level for t in failing] == [0, 0, 0, 0, 1, 1, 2, 3]
    assert [t.guided for t in failing] == [False] * 4 + [True] * 4
    assert [t.train_prefix for t in failing] == [False] * 4 + [False, True, True, True]
    assert failing[-1].prefix_ids == TRACE_B + [EOS] and failing[-1].completion_ids == []
    assert failing[4].completion_ids == [100, 0] and failing[5].completion_ids == [100, 1]
    assert not any(t.guided or t.train_prefix for t in passing)
    assert all(t.prompt_index == 1 and t.reward == 1.0 for t in passing)
    assert all(t.reward == 0.0 for t in failing)
    # every sample scored exactly once, the full solution with its level
    assert sorted(id(t) for batch in scored for t in batch) == sorted(id(t) for t in flatten(groups))
    assert failing[-1] in scored[3]


def test_a_record_with_one_trace_falls_back_to_it_and_is_flagged(caplog, monkeypatch):
    """Micro-group 4 asks for trace 1; a record with only trace 0 is guided by trace 0, and
    that sample is flagged (counted per step, warned about once per run) — it was silent."""
    import logging

    import torch.distributed

    from megatron_trapo.train import step as step_module

    one = [PromptItem(Record("problem 0", "42", ["a"]), [1, 2, 3], [TRACE_A],
                      [[f"t{t}" for t in TRACE_A]])]
    groups = sample_groups(one, ScriptedEngine(), lambda trajs: None, METHODS["trapo"],
                           MicroGroupConfig(), SamplingParams(temperature=1.0, max_new_tokens=64),
                           EOS, seed=5)
    last = groups[0][-1]
    assert last.level == 3 and last.prefix_ids == TRACE_A + [EOS] and last.trace_fallback
    assert not any(t.trace_fallback for t in groups[0][:-1])  # levels 1-2 want trace 0
    assert step_module.rollout_metrics(flatten(groups))["rollout/trace_fallbacks"] == 1.0
    _, _, two = run("trapo")  # records with two traces: no fallback
    assert step_module.rollout_metrics(flatten(two))["rollout/trace_fallbacks"] == 0.0
    monkeypatch.setattr(step_module, "_warned_fallback", False)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    with caplog.at_level(logging.WARNING, logger="megatron_trapo.train.step"):
        step_module.warn_trace_fallback(flatten(groups), [0, 0, 0, 1])
        step_module.warn_trace_fallback(flatten(groups), [0, 0, 0, 1])
    warned = [r for r in caplog.records if "trace_fallbacks" in r.getMessage()]
    assert len(warned) == 1 and "micro-group(s) [3]" in warned[0].getMessage()


def test_grpo_is_one_level_of_free_rollouts():
    engine, scored, groups = run("grpo")
    assert len(engine.calls) == 1
    assert [(r.prefix_ids, r.sampling.n) for r in engine.calls[0]] == [([], 8), ([], 8)]
    assert all(not t.guided and not t.train_prefix and t.level == 0 for t in flatten(groups))
    assert [t.completion_ids for t in groups[1]] == [[101, j] for j in range(8)]
    assert [t.weight_version for t in groups[0]] == ["v7"] * 8
    assert len(scored) == 1 and len(scored[0]) == 16


@pytest.mark.parametrize("k", [1, 2])
def test_luffy_adds_k_full_expert_solutions_scored_as_samples(k):
    engine, scored, groups = run("luffy", off_policy=k)
    assert [r.sampling.n for r in engine.calls[0]] == [8 - k, 8 - k] and len(engine.calls) == 1
    for g in groups:
        expert = g[8 - k:]
        assert len(g) == 8 and all(t.level == 1 and t.guided and t.train_prefix for t in expert)
        assert all(t.prefix_ids == TRACE_B + [EOS] and t.completion_ids == [] for t in expert)
    assert [len(batch) for batch in scored] == [2 * (8 - k), 2 * k]
    assert groups[1][-1].reward == 1.0 and groups[0][-1].reward == 0.0


def test_sft_is_the_first_solution_without_engine_or_reward():
    engine, scored, groups = run("sft")
    assert engine.calls == [] and scored == []
    assert [[(t.prefix_ids, t.train_prefix, t.reward) for t in g] for g in groups] == \
        [[(TRACE_A + [EOS], True, 1.0)]] * 2


def test_a_long_trace_is_cut_to_the_response_budget():
    engine = ScriptedEngine()
    groups = sample_groups(items()[:1], engine, lambda trajs: None, METHODS["trapo"],
                           MicroGroupConfig(), SamplingParams(max_new_tokens=3), EOS, seed=0)
    # the trace is cut to the budget first (3 tokens, 4 with EOS), then 50 %: int(2.0) = 2
    assert engine.calls[2][0].prefix_ids == TRACE_A[:2]
    assert groups[0][-1].prefix_ids == TRACE_B  # 3 + EOS cut to 3


@pytest.mark.parametrize("name", ["sft", "luffy"])
def test_a_whole_expert_sample_is_cut_to_the_response_budget(name):
    """SFT's and LUFFY's whole expert solutions are cut to the response budget (then without
    EOS), as the reference truncates its targets, instead of failing the micro-batch (or, for
    SFT, the preflight skipping the row; fidelity review D5)."""
    groups = sample_groups(items()[:1], ScriptedEngine(), lambda trajs: None, METHODS[name],
                           MicroGroupConfig(), SamplingParams(max_new_tokens=5), EOS, seed=0)
    expert = [t for t in groups[0] if t.guided]
    trace = TRACE_A if name == "sft" else TRACE_B  # SFT: the first trace, LUFFY: the last
    assert expert and all(t.prefix_ids == (trace + [EOS])[:5] for t in expert)


@pytest.mark.parametrize("name", ["trapo_prefix_context", "trapo_luffy_prefix"])
def test_ablations_sample_like_trapo(name):
    ours, theirs = run(name), run("trapo")
    assert [[(r.prefix_ids, r.sampling.n) for r in c] for c in ours[0].calls] == \
        [[(r.prefix_ids, r.sampling.n) for r in c] for c in theirs[0].calls]


class SeededEngine(ScriptedEngine):
    """Sample j of a request is a function of its seed and prefix only (as a seeded engine's
    samples are), not of its position in the batch."""

    def generate(self, requests):
        self.calls.append(list(requests))
        return [[Sample([r.sampling.seed % 97, j, len(r.prefix_ids)], [-0.5] * 3, "stop", "v7",
                        len(r.prefix_ids)) for j in range(r.sampling.n)] for r in requests]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shares_of_the_prompts_merge_into_the_whole(name):
    """Data-parallel rollouts: two ranks sampling every other prompt, merged in prompt order,
    give exactly the groups one rank sampling all of them gets (seeds, prompt indices, levels,
    guidance, rewards)."""
    prompts = items() + items()  # 4 prompts: 0 and 2 fail, 1 and 3 succeed

    def score(trajs):
        for t in trajs:
            t.reward = float(t.prompt_index % 2 == 1)

    def sample(indices=None):
        return sample_groups(prompts, SeededEngine(), score, METHODS[name], MicroGroupConfig(),
                             SamplingParams(temperature=1.0, max_new_tokens=64), EOS, seed=5,
                             indices=indices)

    whole = sample()
    parts = [sample(RolloutShare(r, 2).indices(len(prompts))) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    merged = RolloutShare(0, 2).merge(parts, len(prompts))
    assert merged == whole
    assert [t.prompt_index for t in flatten(merged)] == [t.prompt_index for t in flatten(whole)]
    assert sorted({t.prompt_index for t in flatten(parts[1])}) == [1, 3]
    with pytest.raises(RuntimeError, match="rollout rank 1 returned 1 results for 2 prompts"):
        RolloutShare(0, 2).merge([parts[0], parts[1][:1]], len(prompts))


class RequestSeededEngine(RolloutEngine):
    """Each sample a function of its request alone (prompt, prefix, seed, j), as a seeded
    engine's would be: answers do not depend on what else is in the batch."""

    name = "seeded"

    def __init__(self):
        self.calls = []

    @property
    def weight_version(self):
        return "v1"

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            key = hash((tuple(r.prompt_ids), tuple(r.prefix_ids), r.sampling.seed))
            out.append([Sample([100 + (key + 7 * j) % 50, j], [-0.1 * j, -0.2], "stop", "v1",
                               len(r.prefix_ids)) for j in range(r.sampling.n)])
        return out


def _groups(speculative):
    """7 prompts: 0-1 always fail, 2-3 always succeed, 4-5 succeed when a sample's first
    token is even, 6 has no expert trace — so levels go every way the schedule allows."""
    engine, scored = RequestSeededEngine(), []

    def score(trajs):
        scored.append(sorted((t.prompt_index, t.level, tuple(t.completion_ids)) for t in trajs))
        for t in trajs:
            even = bool(t.completion_ids) and t.completion_ids[0] % 2 == 0
            t.reward = {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}.get(t.prompt_index, float(even))

    texts = lambda ids: [f"t{t}" for t in ids]  # noqa: E731
    its = [PromptItem(Record(f"problem {k}", "42", ["a", "b"]), [1, 2, 3 + k],
                      [TRACE_A, TRACE_B], [texts(TRACE_A), texts(TRACE_B)]) for k in range(6)]
    its.append(PromptItem(Record("no trace", "1", []), [1, 9], [], []))  # never guided
    groups = sample_groups(its, engine, score, METHODS["trapo"], MicroGroupConfig(),
                           SamplingParams(temperature=1.0, max_new_tokens=64), EOS, seed=3,
                           speculative=speculative)
    return engine, scored, groups


def test_speculative_levels_give_the_same_groups_from_one_engine_call():
    lazy_engine, lazy_scored, lazy = _groups(False)
    spec_engine, spec_scored, spec = _groups(True)
    assert spec == lazy  # every trajectory, field by field (rewards included)
    assert spec_scored == lazy_scored  # the same samples scored, level by level
    # one call per generating level (the last level is a free sample where not guided)
    assert len(lazy_engine.calls) == 4 and len(spec_engine.calls) == 1
    # the schedule went both ways at the speculated levels: the comparison is not vacuous
    decided = {(t.level, t.guided) for g in lazy for t in g if t.level in (1, 2)}
    assert decided == {(1, True), (1, False), (2, True), (2, False)}
    # generated up front: level 0 (4 each); for the 6 traced prompts both versions of levels
    # 1 (2 + 2) and 2 (1 + 1) and the free version of level 3 (its guided one is the full
    # solution); for the untraced prompt the free versions only (2 + 1 + 1)
    spec_rows = sum(r.sampling.n for r in spec_engine.calls[0])
    lazy_rows = sum(r.sampling.n for call in lazy_engine.calls for r in call)
    assert spec_rows == 7 * 4 + 6 * 7 + 4 > lazy_rows
