"""One sample of a prompt's group, as the sampler made it and the reward scored it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from megatron_trapo.algorithms.losses import group_advantages


@dataclass
class Trajectory:
    prompt_index: int  # the prompt's place in the step
    prompt_ids: List[int]
    prefix_ids: List[int]  # expert-prefix tokens (empty for free rollouts)
    completion_ids: List[int]  # the policy's own tokens
    rollout_logprobs: List[float]  # the engine's raw logprobs of completion_ids
    train_prefix: bool  # prefix tokens get the TrSFT / SFT / shaping loss
    level: int = 0
    guided: bool = False
    reward: float = 0.0
    advantage: float = 0.0
    finish_reason: str = "length"
    weight_version: str = ""
    # guided by the first expert trace because the record lacks the one its level asks for
    # (sampler.trace_index; the reference's micro-group 4 reads a second trace)
    trace_fallback: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.prefix_ids) + len(self.completion_ids)


def assign_advantages(trajs: Sequence[Trajectory], group_size: int, normalize_std: bool = False,
                      on_policy_stats_only: bool = False) -> None:
    """Group-relative advantages over each prompt's G samples (guided ones included). With
    ``on_policy_stats_only`` (LUFFY's ``grpo_split``) the mean/std come from the unguided
    samples only, with that estimator's guards: a zero std counts as 1, and a lone unguided
    sample gives mean 0 and std 1 — else an all-wrong on-policy set divides the expert's
    reward by 1e-6 (fidelity review D3)."""
    if not on_policy_stats_only:
        rewards = torch.tensor([t.reward for t in trajs])
        for t, a in zip(trajs, group_advantages(rewards, group_size, normalize_std).tolist()):
            t.advantage = a
        return
    for g in range(0, len(trajs), group_size):
        group = trajs[g:g + group_size]
        # a group without unguided samples (LUFFY always has G − k of them) takes all its own
        base = [t.reward for t in group if not t.guided] or [t.reward for t in group]
        if len(base) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(base) / len(base)
            std = (sum((r - mean) ** 2 for r in base) / (len(base) - 1)) ** 0.5 or 1.0
        for t in group:
            t.advantage = (t.reward - mean) / (std + 1e-6) if normalize_std else t.reward - mean
