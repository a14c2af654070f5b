"""From prompts to scored groups of trajectories: the micro-group schedule driven level by
level, each level's requests for all prompts sent to the engine as one batch, rewards scored
before the next level is planned.

Modes: ``trapo`` / ``trapo_plain_sft`` (the schedule), ``grpo`` (G free rollouts), ``luffy``
(G − k free rollouts + k full expert solutions, off-policy), ``sft`` (the full expert
solution, no rollouts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from megatron_trapo.algorithms.micro_group import MicroGroupConfig, cut_prefix, plan_level
from megatron_trapo.algorithms.trajectory import Trajectory
from megatron_trapo.data.prompts import expert_text, render_prompt
from megatron_trapo.data.records import Record
from megatron_trapo.rollout.types import RolloutEngine, RolloutRequest, SamplingParams


@dataclass
class PromptItem:
    record: Record
    prompt_ids: List[int]
    traces: List[List[int]]  # expert solutions, tokenised
    trace_texts: List[List[str]]  # each token's text, for the "\n\n" snapping rule


def encode(records: Sequence[Record], tokenizer) -> List[PromptItem]:
    items = []
    for r in records:
        prompt = tokenizer(render_prompt(tokenizer, r.problem), add_special_tokens=False)["input_ids"]
        traces = [tokenizer(expert_text(s), add_special_tokens=False)["input_ids"] for s in r.solutions]
        texts = [[tokenizer.decode([t]) for t in tr] for tr in traces]
        items.append(PromptItem(r, prompt, traces, texts))
    return items


def _score(trajs: Sequence[Trajectory], items: Sequence[PromptItem], tokenizer, reward) -> None:
    pairs = [(tokenizer.decode(t.prefix_ids + t.completion_ids, skip_special_tokens=True),
              items[t.group].record.answer) for t in trajs]
    for t, r in zip(trajs, reward.score(pairs)):
        t.reward = r


def generate_groups(items: Sequence[PromptItem], engine: RolloutEngine, reward, tokenizer,
                    mode: str, sampler: MicroGroupConfig, sampling: SamplingParams,
                    eos_id: int, seed: int, luffy_off_policy: int = 1) -> List[Trajectory]:
    """Trajectories grouped per prompt (G consecutive per prompt, in level order)."""
    groups: List[List[Trajectory]] = [[] for _ in items]
    if mode == "sft":
        for g, it in enumerate(items):
            groups[g].append(Trajectory(g, it.prompt_ids, it.traces[0] + [eos_id], [], [], True,
                                        guided=True, reward=1.0))
        return [t for grp in groups for t in grp]
    if mode in ("grpo", "luffy"):
        k = luffy_off_policy if mode == "luffy" else 0
        levels = [("free", sampler.group_size - k)] + ([("expert", k)] if k else [])
    else:
        levels = [("schedule", level) for level in range(len(sampler.budgets))]
    for li, (kind, arg) in enumerate(levels):
        requests, owners = [], []
        for g, it in enumerate(items):
            if kind == "expert":
                for _ in range(arg):
                    groups[g].append(Trajectory(g, it.prompt_ids, it.traces[-1] + [eos_id], [], [],
                                                True, li, True))
                continue
            if kind == "free":
                plans, n = None, arg
                prefix, guided = [], False
            else:
                rewards = [t.reward for t in groups[g]]
                plans = plan_level(sampler, arg, rewards, len(it.traces))
                p0 = plans[0]
                guided = p0.guided
                prefix = []
                if guided:
                    trace = it.traces[p0.trace]
                    cut = cut_prefix(it.trace_texts[p0.trace], p0.prefix_ratio, sampler.snap_window)
                    prefix = trace[:cut] + ([eos_id] if p0.full_solution else [])
                    # the prefix counts against the response budget (TRAPO.md §4): a longer
                    # expert trace is cut to it rather than failing the step
                    prefix = prefix[:sampling.max_new_tokens]
                n = len(plans)
                if guided and p0.full_solution:  # the whole solution is the sample: no rollout
                    for p in plans:
                        groups[g].append(Trajectory(g, it.prompt_ids, prefix, [], [],
                                                    p.train_prefix, arg, True))
                    continue
            sp = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                                stop_token_ids=sampling.stop_token_ids,
                                seed=(seed * 1_000_003 + g * 101 + li * 17) % (2**31))
            requests.append(RolloutRequest(it.prompt_ids, sp, prefix))
            owners.append((g, plans, prefix, guided))
        new: List[Trajectory] = []
        if requests:
            for (g, plans, prefix, guided), samples in zip(owners, engine.generate(requests)):
                for j, s in enumerate(samples):
                    train_prefix = plans[j].train_prefix if plans else False
                    t = Trajectory(g, items[g].prompt_ids, prefix, s.token_ids, s.logprobs,
                                   train_prefix, li, guided, finish_reason=s.finish_reason,
                                   weight_version=s.weight_version)
                    groups[g].append(t)
                    new.append(t)
        new += [t for grp in groups for t in grp if t.level == li and not t.completion_ids
                and t.guided]
        _score(new, items, tokenizer, reward)
    return [t for grp in groups for t in grp]
