"""From prompts to scored groups of trajectories, level by level.

A method's sampling (``Method.sampling``, algorithms/methods.py) is a list of :class:`Level` s.
Before each level, every prompt gets a :class:`Plan` from what its group scored so far — free
rollouts, rollouts continuing an expert prefix, or fixed expert samples with nothing to
generate. One loop (:func:`sample_groups`) sends a level's requests for all prompts to the engine
as one batch and scores the new samples before the next level is planned (TRAPO's micro-groups
need the rewards between levels).

- ``schedule``: the micro-group levels (algorithms/micro_group.py);
- ``free``: G free rollouts;
- ``free_plus_expert``: G − k free rollouts, then k full expert solutions (LUFFY, off-policy);
- ``expert_only``: the first expert solution, taken as correct (SFT; no rollouts, no reward).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

from megatron_trapo.algorithms.methods import Method
from megatron_trapo.algorithms.micro_group import (MicroGroupConfig, can_be_guided, cut_prefix,
                                                  is_guided, level_samples)
from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.data.items import PromptItem
# the engine contract (types only, no engine): the one rollout module this layer uses
from megatron_trapo.rollout.types import RolloutEngine, RolloutRequest, Sample, SamplingParams

Groups = List[List[Trajectory]]  # one list per prompt, its samples in level order


@dataclass(frozen=True)
class Level:
    kind: Literal["free", "schedule", "expert"]
    index: int  # Trajectory.level of its samples
    n: int = 0  # free / expert: samples per prompt (schedule: the micro-group's budget)
    trace: int = 0  # expert: which expert solution (0 the first, -1 the last)
    scored: bool = True  # expert samples that are not scored count as correct (SFT)


@dataclass
class Plan:
    """One prompt's samples at one level."""

    prefix_ids: List[int]  # expert tokens the samples start with (or are, when not generating)
    train_prefix: List[bool]  # per sample: the prefix gets the method's expert-token loss
    guided: bool
    generate: bool  # False: the prefix is the whole sample (a full expert solution)
    # guided by trace 0 because the record has no trace sampler.trace_index asks for
    trace_fallback: bool = False


def levels(method: Method, sampler: MicroGroupConfig, off_policy: int) -> List[Level]:
    """The levels of a method's group (``off_policy``: LUFFY's k)."""
    if method.sampling == "expert_only":
        return [Level("expert", 0, 1, trace=0, scored=False)]
    if method.sampling == "schedule":
        return [Level("schedule", i, n) for i, n in enumerate(sampler.budgets)]
    k = off_policy if method.sampling == "free_plus_expert" else 0
    return [Level("free", 0, sampler.group_size - k)] + ([Level("expert", 1, k, trace=-1)]
                                                        if k else [])


def plan(level: Level, item: PromptItem, group: Sequence[Trajectory], sampler: MicroGroupConfig,
         eos_id: int, max_new_tokens: int) -> Plan:
    """What ``item`` gets at ``level``, given its group so far."""
    if level.kind == "free":
        return Plan([], [False] * level.n, guided=False, generate=True)
    if level.kind == "expert":  # the whole solution, cut to the response budget (then no EOS)
        return Plan((item.traces[level.trace] + [eos_id])[:max_new_tokens], [True] * level.n,
                    guided=True, generate=False)
    guided = bool(item.traces) and is_guided(sampler, level.index, [t.reward for t in group])
    return schedule_plan(level, item, sampler, eos_id, max_new_tokens, guided)


def schedule_plan(level: Level, item: PromptItem, sampler: MicroGroupConfig, eos_id: int,
                  max_new_tokens: int, guided: bool) -> Plan:
    """A micro-group level's plan once it is decided whether it is guided."""
    samples = level_samples(sampler, level.index, guided, len(item.traces))
    first = samples[0]
    prefix: List[int] = []
    if first.guided:
        # the prefix counts against the response budget (paper §4): a longer expert trace is
        # cut to it first (as the reference does), rather than failing the step
        trace = item.traces[first.trace][:max_new_tokens]
        texts = item.trace_texts[first.trace][:max_new_tokens]
        cut = cut_prefix(texts, first.prefix_ratio, sampler.snap_window)
        prefix = (trace[:cut] + ([eos_id] if first.full_solution else []))[:max_new_tokens]
    fallback = first.guided and sampler.trace_index[level.index] > first.trace
    return Plan(prefix, [s.train_prefix for s in samples], guided=first.guided,
                generate=not (first.guided and first.full_solution), trace_fallback=fallback)


def level_seed(seed: int, prompt: int, level: int) -> int:
    """The sampling seed of one prompt's level (sample j then uses seed + j)."""
    return (seed * 1_000_003 + prompt * 101 + level * 17) % (2**31)


def sample_groups(items: Sequence[PromptItem], engine: RolloutEngine,
                  score: Callable[[List[Trajectory]], None], method: Method,
                  sampler: MicroGroupConfig, sampling: SamplingParams, eos_id: int, seed: int,
                  off_policy: int = 1, indices: Optional[Sequence[int]] = None,
                  speculative: bool = False) -> Groups:
    """The groups of ``items[i]`` for each ``i`` in ``indices`` (default: every prompt), in
    that order; ``score`` sets ``reward`` on the trajectories it is given. A prompt's samples
    depend on its index in ``items`` only, so a data-parallel rank that samples its share
    gets the groups a single rank would.

    ``speculative`` (micro-group schedules): every level's samples are generated up front in
    one engine call, both the guided and the free version where the rewards decide, and each
    level then keeps the version its plan picks — the same groups (same seeds, same scoring
    order) from one decoding pass instead of one per level, for up to ~40% more generated
    samples. Worth it where decoding is latency-bound (a small batch on an in-process engine),
    not on a server that is throughput-bound."""
    indices = range(len(items)) if indices is None else indices
    groups: Dict[int, List[Trajectory]] = {g: [] for g in indices}
    order = {g: k for k, g in enumerate(indices)}
    all_levels = levels(method, sampler, off_policy)
    ahead = _generate_ahead(items, indices, engine, sampler, sampling, eos_id, seed, all_levels) \
        if speculative and method.sampling == "schedule" else {}
    for level in all_levels:
        requests, owners, fixed, ready = [], [], [], []
        for g in indices:
            item = items[g]
            p = plan(level, item, groups[g], sampler, eos_id, sampling.max_new_tokens)
            if not p.generate:
                samples = [Trajectory(prompt_index=g, prompt_ids=item.prompt_ids,
                                      prefix_ids=p.prefix_ids, completion_ids=[],
                                      rollout_logprobs=[], train_prefix=train, level=level.index,
                                      guided=True, reward=0.0 if level.scored else 1.0,
                                      trace_fallback=p.trace_fallback)
                           for train in p.train_prefix]
                groups[g] += samples
                fixed += samples if level.scored else []
                continue
            generated = ahead.pop((g, level.index, p.guided), None)
            if generated is not None:
                ready.append(((g, p), generated))
                continue
            sp = dataclasses.replace(sampling, n=len(p.train_prefix),
                                     seed=level_seed(seed, g, level.index))
            requests.append(RolloutRequest(item.prompt_ids, sp, p.prefix_ids))
            owners.append((g, p))
        if requests:
            ready += list(zip(owners, engine.generate(requests)))
        new: List[Trajectory] = []
        for (g, p), samples in sorted(ready, key=lambda r: order[r[0][0]]):
            for s, train in zip(samples, p.train_prefix):
                t = Trajectory(prompt_index=g, prompt_ids=items[g].prompt_ids,
                               prefix_ids=p.prefix_ids, completion_ids=s.token_ids,
                               rollout_logprobs=s.logprobs, train_prefix=train,
                               level=level.index, guided=p.guided,
                               finish_reason=s.finish_reason, weight_version=s.weight_version,
                               trace_fallback=p.trace_fallback)
                groups[g].append(t)
                new.append(t)
        if new or fixed:
            score(new + fixed)
    return [groups[g] for g in indices]


def _generate_ahead(items: Sequence[PromptItem], indices: Sequence[int], engine: RolloutEngine,
                    sampler: MicroGroupConfig, sampling: SamplingParams, eos_id: int, seed: int,
                    all_levels: Sequence[Level]) -> Dict[Tuple[int, int, bool], List[Sample]]:
    """Every version a micro-group level may take, generated in one engine call: keyed by
    (prompt, level, guided). The first level's version is known before any reward."""
    keys, requests = [], []
    for level in all_levels:
        for g in indices:
            item = items[g]
            if level.index == 0:
                options = [bool(item.traces) and is_guided(sampler, 0, [])]
            else:
                options = [False] + ([True] if can_be_guided(sampler, level.index,
                                                             len(item.traces)) else [])
            for guided in options:
                p = schedule_plan(level, item, sampler, eos_id, sampling.max_new_tokens, guided)
                if not p.generate:
                    continue
                sp = dataclasses.replace(sampling, n=len(p.train_prefix),
                                         seed=level_seed(seed, g, level.index))
                requests.append(RolloutRequest(item.prompt_ids, sp, p.prefix_ids))
                keys.append((g, level.index, guided))
    return dict(zip(keys, engine.generate(requests))) if requests else {}


def reward_scorer(items: Sequence[PromptItem], tokenizer, reward) -> Callable:
    """``score`` for :func:`sample_groups`: prefix + completion decoded, graded against the
    prompt's answer by ``reward.score``."""
    def score(trajs: List[Trajectory]) -> None:
        pairs = [(tokenizer.decode(t.prefix_ids + t.completion_ids, skip_special_tokens=True),
                  items[t.prompt_index].record.answer) for t in trajs]
        for t, r in zip(trajs, reward.score(pairs)):
            t.reward = r

    return score


def flatten(groups: Groups) -> List[Trajectory]:
    return [t for group in groups for t in group]
