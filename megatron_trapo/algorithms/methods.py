"""Every training method as one value: how its groups are sampled, which loss its expert tokens
get, whether its own tokens get the policy gradient, how advantages are grouped.

``loss.loss_mode`` names one of :data:`METHODS` (or a pipeline of them, :data:`PIPELINES`); the
rest of the code asks the :class:`Method`, never the string. Adding a method is adding one
value here and, if its math is new, one function in ``algorithms/losses.py`` (dispatched by
``losses.expert_token_loss`` on :attr:`Method.expert_loss`). Pure data: no torch, so that the
config can take its list of names from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

Sampling = Literal["schedule", "free", "free_plus_expert", "expert_only"]
ExpertLoss = Literal["trsft", "sft", "luffy_shaping", "none"]
ExpertText = Literal["reasoning", "full"]


@dataclass(frozen=True)
class Method:
    """What one training method does with a step's groups."""

    name: str
    # schedule: TRAPO's micro-groups (free rollouts, then expert prefixes while they fail);
    # free: G free rollouts; free_plus_expert: G − k free rollouts + k full expert solutions
    # (LUFFY's off-policy samples); expert_only: the expert solution itself (SFT)
    sampling: Sampling
    expert_loss: ExpertLoss  # the loss of flagged expert tokens
    policy_gradient: bool  # the model's own tokens get the group-relative policy gradient
    clip: Literal["config", "luffy"] = "config"  # loss.clip_ratio_low/high, or loss.luffy
    # the advantage the expert-token loss is given: the sample's own (LUFFY's off-policy
    # samples), or 1 (the reference's prefix tokens under its TRAPO code, mix_actor.py:109:
    # off_advantages = ones, so a shaped prefix is always pulled up, never pushed down)
    expert_advantage: Literal["sample", "one"] = "sample"
    # which text of an expert solution the method trains on (data.expert_text can override):
    # the reasoning inside <think>…</think> (the reference's TRAPO prefixes), or the full
    # target — reasoning, </think> and final solution (LUFFY's off-policy samples, the SFT
    # baseline; fidelity review D4/D5)
    expert_text: ExpertText = "reasoning"
    description: str = ""

    @property
    def needs_solution(self) -> bool:
        """Every training row needs at least one expert solution."""
        return self.sampling != "free"

    @property
    def needs_old_logprobs(self) -> bool:
        return self.policy_gradient

    def advantage_group(self, group_size: int) -> int:
        """Samples per advantage group: a prompt's G samples (an SFT sample is its own)."""
        return group_size if self.sampling != "expert_only" else 1


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("trapo", "schedule", "trsft", True,
           description="micro-group schedule; TrSFT on flagged prefixes, PG on own tokens"),
    Method("trapo_plain_sft", "schedule", "sft", True,
           description="the schedule with plain SFT on prefixes (the paper's collapse ablation)"),
    # the paper's ablation ladder between GRPO and TRAPO (Table 3): the schedule with the
    # prefixes as context only, then with LUFFY's shaping on them
    Method("trapo_prefix_context", "schedule", "none", True,
           description="the schedule; prefixes are context only (no loss on them)"),
    Method("trapo_luffy_prefix", "schedule", "luffy_shaping", True, expert_advantage="one",
           description="the schedule with LUFFY's f(p) = p/(p+γ) shaping on flagged prefixes "
                       "(advantage 1, as the reference's ablation)"),
    Method("grpo", "free", "none", True, description="G free rollouts, group-relative PG"),
    Method("luffy", "free_plus_expert", "luffy_shaping", True, clip="luffy", expert_text="full",
           description="free rollouts + full expert solutions with f(p) = p/(p+γ) shaping"),
    Method("sft", "expert_only", "sft", False, expert_text="full",
           description="SFT on the expert solutions"),
)}

@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: a method run in its own checkpoint/log sub-folder; the next
    stage starts from its checkpoint. ``settings``: the TrainConfig field with the stage's own
    data, batch, length and optimizer (None: the run's own)."""

    folder: str
    method: str
    settings: Optional[str] = None


# Methods run one after another, each a stage with its own checkpoint and log folder.
PIPELINES: Dict[str, Tuple[Stage, ...]] = {
    "sft_then_rl": (Stage("sft", "sft", "sft_stage"), Stage("rl", "grpo")),
}

LOSS_MODES: Tuple[str, ...] = (*METHODS, *PIPELINES)


def method(name: str) -> Method:
    """The method ``loss.loss_mode`` names (a pipeline is run stage by stage: :func:`stages`)."""
    if name in PIPELINES:
        raise KeyError(f"loss_mode={name} is a pipeline of "
                       f"{[s.method for s in PIPELINES[name]]}; a step runs one of its stages")
    return METHODS[name]


def stages(name: str) -> List[Method]:
    """The methods a run of ``loss_mode=name`` goes through (one for a plain method)."""
    if name in PIPELINES:
        return [METHODS[s.method] for s in PIPELINES[name]]
    return [METHODS[name]]


def is_pipeline(name: str) -> bool:
    return name in PIPELINES


def clip_range(m: Method, cfg) -> Tuple[Optional[float], Optional[float]]:
    """The PPO clip range of the method's policy-gradient tokens."""
    if m.clip == "luffy":
        return cfg.luffy.clip_ratio, cfg.luffy.clip_ratio
    return cfg.clip_ratio_low, cfg.clip_ratio_high
