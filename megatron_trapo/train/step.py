"""One TRAPO step, top to bottom: prompts → micro-group rollouts → rewards → advantages →
masked micro-batches → old logprobs → Megatron forward/backward + optimizer step → weight
sync → metrics. Every rank runs it; rollouts happen on global rank 0 — or, with data-parallel
rollouts, on every rank for its share of the prompts — and the trajectories are shared so that
every rank builds the same batch and takes its share of the training."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Literal, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from megatron_trapo.algorithms.methods import method
from megatron_trapo.algorithms.sampler import Groups, flatten, reward_scorer, sample_groups
from megatron_trapo.algorithms.trajectory import Trajectory, assign_advantages
from megatron_trapo.config import ConfigError, LossConfig
from megatron_trapo.models.provider import have_transformer_engine
from megatron_trapo.platform.distributed import broadcast_object, host_group
from megatron_trapo.rollout.types import SamplingParams
from megatron_trapo.train.batch import (build_sequences, make_microbatches, model_forward,
                                        pack_microbatches, row_multiple, split_for_rank, to_device)
from megatron_trapo.train import memory
from megatron_trapo.train.forward_backward import run_forward_backward, train_step
from megatron_trapo.train.loss_func import (global_normaliser, make_forward_step,
                                            reduce_loss_metrics, token_logprobs_entropy)
from megatron_trapo.train.output_layer import hidden_states_out, output_weight
from megatron_trapo.train.run import RolloutShare
from megatron_trapo.train.timing import TimedEngine

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    metrics: Dict[str, float]
    groups: Groups  # every prompt's trajectories (on every rank), as the step trained on them


MEMORY_STEPS = 2  # the steps that log memory/<part>_gb (the first is the largest, usually)


def trapo_step(run, step: int) -> StepResult:
    """One step of any method. ``run`` is a :class:`megatron_trapo.train.trainer.Run`."""
    cfg, timers = run.cfg, run.timers
    m = method(cfg.loss.loss_mode)
    # 1-3. this step's prompts, their micro-group rollouts and rewards (the generating ranks)
    local, side, sources = None, run.rollout, None
    if side is not None:  # a generating rank: its share of the prompts
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.loss.max_response_length,
                                  stop_token_ids=run.stop_ids)
        items = side.data.batch(step)
        sources = [it.record.source for it in items]
        score = timers.timed("reward", reward_scorer(items, run.tokenizer, side.reward))
        local = sample_groups(items, TimedEngine(side.engine, timers), score, m, cfg.sampler,
                              sampling, run.eos_id, seed=cfg.seed * 7919 + step,
                              off_policy=cfg.loss.luffy.off_policy,
                              indices=side.share.indices(len(items)),
                              speculative=speculative_levels(cfg))
    health = run.engine.health_metrics() if run.engine is not None else {}
    memory.release_freed_memory()  # the generation's temporaries, before training allocates
    groups = gather_shares(local, side.share if side is not None else None)  # on every rank
    trajs = flatten(groups)
    # 4. group-relative advantages over each prompt's samples
    group = m.advantage_group(cfg.sampler.group_size)
    assign_advantages(trajs, group, cfg.advantage.normalize_std,
                      cfg.loss.luffy.on_policy_stats_only)
    # 5. per-token masks and weights; the prompts in batching.ppo_mini_batches parts (whole
    #    groups), each part this rank's share in micro-batches under a token budget
    seqs = build_sequences(trajs, cfg.loss)
    parts = [prepare_update(part, cfg, run) for part in
             mini_batches(seqs, [len(g) for g in groups], cfg.batching.ppo_mini_batches)]
    # 6. old logprobs: the current ones when strictly on-policy, else a forward pass before
    #    the first update (the rollout logprobs stay for TIS)
    source = old_logprobs_source(cfg) if m.needs_old_logprobs else "rollout"
    if source == "recompute":
        with timers.phase("old_logprobs"):
            for part in parts:
                fill_old_logprobs(run.ddp, part.mbs, cfg.loss, part.seq_len, part.mb_size)
    # 7. Megatron forward/backward over each part's micro-batches and an optimizer step per
    #    part, batching.ppo_epochs times over the parts
    outs = [train_step(run.ddp, run.optimizer, run.scheduler, part.mbs,
                       make_forward_step(cfg.loss, part.normaliser,
                                         old_is_current=source == "current"),
                       part.seq_len, part.mb_size, timers=timers,
                       measure_memory=step < MEMORY_STEPS and not k)
            for k, part in enumerate(p for _ in range(cfg.batching.ppo_epochs) for p in parts)]
    out = {"losses": [o for u in outs for o in u["losses"]],
           "grad_norm": _mean([u["grad_norm"] for u in outs if u["grad_norm"] is not None]),
           "transient_gb": outs[0]["transient_gb"]}
    memory.release_freed_memory()  # the activations, before the next generation
    train_tokens = float(sum(s["tokens"].numel() for s in seqs))  # every DP rank's
    timers.count("train_tokens", train_tokens)
    # 8. the new weights to the engine; a method that never generates (SFT) leaves them
    #    for the next evaluation to send (the CPU demo's base: 8% of its step time)
    synced = {}
    if run.sync is not None:
        run.unsent_version = str(step + 1)
        if m.sampling != "expert_only":
            with timers.phase("weight_sync"):
                synced = run.sync_engine()
    # 9. metrics
    warn_trace_fallback(trajs, cfg.sampler.trace_index)
    metrics = {**reduce_loss_metrics(out["losses"]), **rollout_metrics(trajs, sources), **health,
               "rollout/generating_ranks": float(side.share.world) if side is not None else 0.0,
               **synced,
               "grad_norm": out["grad_norm"] or 0.0, "lr": run.optimizer.param_groups[0]["lr"],
               "train/tokens": train_tokens, "train/updates": float(len(outs))}
    if step < MEMORY_STEPS:  # where this rank's memory goes (rank 0's row in metrics.jsonl)
        metrics.update(memory.breakdown(run.ddp, run.optimizer, run.engine, out["transient_gb"]))
    return StepResult(metrics, groups)


_warned_fallback = False


def warn_trace_fallback(trajs: Sequence[Trajectory], trace_index: Sequence[int]) -> None:
    """Once per run (rank 0): a micro-group asked for an expert trace the records lack and
    was guided by trace 0 instead (``rollout/trace_fallbacks`` counts it every step). The
    reference's last micro-group reads a second trace (fidelity review D2): merge one with
    ``tools/prepare_data.py --second-trace``."""
    global _warned_fallback
    fallen = [t for t in trajs if t.trace_fallback]
    if fallen and not _warned_fallback and torch.distributed.get_rank() == 0:
        _warned_fallback = True
        levels = sorted({t.level for t in fallen})
        logger.warning("sampler.trace_index=%s: micro-group(s) %s asked for an expert trace "
                       "that %d prompt(s) of this step lack, and were guided by their first "
                       "trace instead (counted per step as rollout/trace_fallbacks; add a "
                       "second trace with tools/prepare_data.py --second-trace)",
                       list(trace_index), levels, len({t.prompt_index for t in fallen}))


def gather_shares(local: Optional[list], share: Optional[RolloutShare]) -> list:
    """The generating ranks' per-prompt results, whole and in prompt order, on every rank:
    broadcast from rank 0 when it generated everything (``share`` None on the ranks that did
    not), else all-gathered from the data-parallel ranks (every rank generates then)."""
    if share is None or share.world == 1:
        return broadcast_object(local)
    parts: List = [None] * share.world
    torch.distributed.all_gather_object(parts, local, group=host_group())
    return share.merge(parts, sum(len(p) for p in parts))


@dataclass
class Update:
    """One optimizer step's share of a rollout batch on this rank: its micro-batches (on
    the device), its loss normaliser over every DP rank, the schedule's shapes."""

    mbs: List[dict]
    normaliser: float
    seq_len: int
    mb_size: int


def mini_batches(seqs: List[dict], group_sizes: Sequence[int], n: int) -> List[List[dict]]:
    """The step's sequences in ``n`` parts of whole prompt groups (consecutive prompts, as
    even as the prompt count allows): advantages were taken over whole groups, and each part
    is one optimizer update (verl's ppo_mini_batch_size = prompts / n)."""
    if sum(group_sizes) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences, but the groups hold {sum(group_sizes)}")
    n = min(n, len(group_sizes))
    bounds = [round(k * len(group_sizes) / n) for k in range(n + 1)]
    starts = [0]
    for size in group_sizes:
        starts.append(starts[-1] + size)
    return [seqs[starts[a]:starts[b]] for a, b in zip(bounds, bounds[1:])]


def prepare_update(seqs: List[dict], cfg, run) -> Update:
    """This rank's micro-batches of ``seqs``, normalised over every DP rank's share."""
    dp = ps.get_data_parallel_world_size()
    if len(seqs) < dp:  # every rank sees the same count, so all of them stop here alike
        raise ConfigError(
            f"an update holds {len(seqs)} sequences for {dp} data-parallel ranks, and each rank "
            f"needs one: raise prompts_per_step ({cfg.prompts_per_step}) or lower "
            f"batching.ppo_mini_batches ({cfg.batching.ppo_mini_batches})")
    mine = split_for_rank(seqs, ps.get_data_parallel_rank(), dp)
    mbs = build_microbatches(mine, seqs, cfg, run.pad_id, run.model.fp8 is not None)
    normaliser = global_normaliser(mbs)  # on the CPU micro-batches, over the gloo DP group
    mbs = [to_device(mb) for mb in mbs]
    return Update(mbs, normaliser, max(mb["tokens"].shape[1] for mb in mbs),
                  max(mb["tokens"].shape[0] for mb in mbs))


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def old_logprobs_source(cfg) -> Literal["recompute", "current", "rollout"]:
    """Where the policy-gradient ratio's log π_old comes from (``batching.
    recompute_old_logprobs``): ``current`` — strictly on-policy (one optimizer step per
    rollout batch, ``batching.ppo_mini_batches = ppo_epochs = 1``, and no TIS), π_old is the
    policy being differentiated, so lp.detach() gives the ratio exp(lp − sg(lp)) = 1 and the
    same gradient as a recompute, without its forward pass; ``recompute`` — a forward pass
    with the current weights before the first update (TIS, several updates per rollout
    batch, or forced); ``rollout`` — the engine's logprobs (forced off)."""
    forced = cfg.batching.recompute_old_logprobs
    if forced is not None:
        return "recompute" if forced else "rollout"
    several = cfg.batching.updates_per_step > 1
    return "recompute" if cfg.loss.tis_cap or several else "current"  # tis_cap 0: off


def build_microbatches(mine: List[dict], seqs: List[dict], cfg, pad_id: int,
                       fp8: bool = False) -> List[dict]:
    """This rank's sequences as packed rows or padded micro-batches (CPU tensors), every row
    a multiple of what TP + sequence parallel, CP and FP8 need; one shape with pipelines."""
    pp = ps.get_pipeline_model_parallel_world_size() > 1  # pipelines need one micro-batch shape
    multiple = row_multiple(ps.get_tensor_model_parallel_world_size(), cfg.parallel.sequence_parallel,
                            fp8, ps.get_context_parallel_world_size())
    pack = cfg.batching.pack_sequences
    if pack is None:
        pack = have_transformer_engine()
    if pack:
        return pack_microbatches(mine, cfg.batching.max_tokens_per_microbatch, pad_id,
                                 fixed_width=pp, multiple=multiple)
    budget = cfg.batching.max_tokens_per_microbatch
    if not torch.cuda.is_available() and cfg.batching.cpu_max_tokens_per_microbatch:
        budget = min(budget, cfg.batching.cpu_max_tokens_per_microbatch)
    width = -(-max(s["tokens"].numel() for s in seqs) // multiple) * multiple
    fixed = (max(1, budget // width), width) if pp else None
    return make_microbatches(mine, budget, pad_id, fixed, multiple)


def _logprob_loss(chunk_size, weight, batch, output):
    lp, _ = token_logprobs_entropy(output, weight, batch["labels"], chunk_size)
    return (output.sum() * 0, torch.zeros((), dtype=torch.int, device=output.device),
            {"lp": lp.detach()})


def speculative_levels(cfg) -> bool:
    """``sampler.speculative``, resolved: null = on for the in-process engine."""
    if cfg.sampler.speculative is not None:
        return cfg.sampler.speculative
    return cfg.rollout.engine == "hf"


@torch.no_grad()
def fill_old_logprobs(chunks, mbs, cfg: LossConfig, seq_len: int, mb_size: int) -> None:
    """Replace ``old_logprobs`` by the current weights' logprobs (last pipeline stage)."""
    def step(batch, model):
        weight = output_weight(model) if cfg.fused_output_layer else None
        with hidden_states_out(model, enabled=weight is not None):
            output = model_forward(model, batch)
        return output, partial(_logprob_loss, cfg.logprob_chunk_size, weight, batch)

    out = run_forward_backward(chunks, mbs, step, seq_len, mb_size, forward_only=True)
    for mb, o in zip(mbs, out):
        mb["old_logprobs"] = o["lp"] * mb["generated_mask"]


MAX_SOURCES = 16  # per-source rewards are logged for at most this many sources in a step


def rollout_metrics(trajs: List[Trajectory], sources: Optional[Sequence[str]] = None
                    ) -> Dict[str, float]:
    """Reward and length of free rollouts (guided samples excluded) and the reward of the first
    micro-group alone (the reference's training curve), the share of prompts whose
    free rollouts are not all equally rewarded, guidance statistics:
    the share of each later micro-group level's samples that are guided (level 0, the free
    rollouts, is never guided). With ``sources`` (each prompt's record source, by its place in
    the step) the free-rollout reward per source too: a step's reward moves with how hard its
    prompts happen to be, and only the per-source curves say whether the policy improved
    (the demo's seed 1 draws harder prompts late: the base's own expected reward falls from
    0.53 over its first 10 steps to 0.47 over its last 10)."""
    free = [t for t in trajs if not t.guided]
    guided = [t for t in trajs if t.guided]
    out = {"rollout/samples": float(len(trajs)),
           "rollout/guided_fraction": len(guided) / max(len(trajs), 1),
           "rollout/full_solution_samples": float(sum(1 for t in guided if not t.completion_ids)),
           "rollout/trace_fallbacks": float(sum(t.trace_fallback for t in guided))}
    first = [t for t in trajs if t.level == 0]  # TRAPO's first micro-group, never guided
    if first and not any(t.guided for t in first):
        # the reference's curve (critic/score/mask1_mean): later levels are free only where a
        # prompt already did well, so the all-free mean below leans high (fidelity review D11)
        out["rollout/reward_first_micro_group"] = sum(t.reward for t in first) / len(first)
    if free:
        out["rollout/reward_unguided"] = sum(t.reward for t in free) / len(free)
        rewards: Dict[int, set] = {}
        for t in free:
            rewards.setdefault(t.prompt_index, set()).add(t.reward)
        # the prompts whose free rollouts disagree: the only ones a group baseline learns from
        out["rollout/prompts_with_signal"] = (sum(len(r) > 1 for r in rewards.values())
                                              / len(rewards))
        out["rollout/length_unguided"] = sum(len(t.completion_ids) for t in free) / len(free)
        if sources:
            by_source: Dict[str, List[float]] = {}
            for t in free:
                by_source.setdefault(sources[t.prompt_index] or "unknown", []).append(t.reward)
            if len(by_source) <= MAX_SOURCES:
                for name, r in sorted(by_source.items()):
                    out[f"rollout/reward_unguided/{name}"] = sum(r) / len(r)
    if guided:
        out["rollout/reward_guided"] = sum(t.reward for t in guided) / len(guided)
    for level in sorted({t.level for t in trajs} - {0}):
        at = [t for t in trajs if t.level == level]
        out[f"rollout/guided_share/level{level}"] = sum(t.guided for t in at) / len(at)
    return out
