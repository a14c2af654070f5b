"""The training run around :func:`megatron_trapo.train.step.trapo_step`: set-up (layout, model,
optimizer, tokenizer, data, engine, reward, weight sync), the loop with progress bar, metrics,
periodic checkpoints and held-out evaluation, exact resume, and the training-curve PNG."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_trapo.algorithms.methods import PIPELINES, Stage, is_pipeline
from megatron_trapo.config import ConfigError, TrainConfig, runtime_model, to_dict
from megatron_trapo.data.items import PromptData
from megatron_trapo.data.split import split_rows
from megatron_trapo.data.tokenizer import stop_token_ids
from megatron_trapo.metrics import MetricsLogger, continue_log
from megatron_trapo.models.hf.mapping import model_to_hf_config
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.plotting import plot_curves
from megatron_trapo.reward.grading import grade_all
from megatron_trapo.reward.math_reward import MathReward
from megatron_trapo.rollout import make_engine
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams
from megatron_trapo.rollout.weight_sync import WeightSync
from megatron_trapo.train.cpu_memory import plan_cpu_memory
from megatron_trapo.train.checkpoint import (checkpoint_optimizer_metadata, latest_iteration,
                                             load_checkpoint, save_checkpoint)
from megatron_trapo.train.memory import fix_mmap_threshold, peak_memory_gb
from megatron_trapo.train.optimizer import build_training_state
from megatron_trapo.train.preemption import Preempted, StopRequest
from megatron_trapo.train.profiling import StepProfiler
from megatron_trapo.train.preflight import (check_all_data, check_paths, load_tokenizer,
                                            tokenizer_folder)
from megatron_trapo.train.pretrained import model_config_from_checkpoint
from megatron_trapo.train.run import RolloutShare, RolloutSide, Run
from megatron_trapo.train.step import gather_shares, speculative_levels, trapo_step
from megatron_trapo.train.timing import postfix

logger = logging.getLogger(__name__)


def setup(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> tuple:
    """``(run, first step, trainer state)``: a fresh run, or the one in ``checkpoint.save``
    continued (``resume``)."""
    # preflight, on every rank and before any model is built: paths, tokenizer, data rows
    check_paths(cfg, resume, overwrite)
    model = runtime_model(model_config_from_checkpoint(cfg.load), cfg.model) if cfg.load \
        else cfg.model
    tokenizer = load_tokenizer(cfg)
    train_items, eval_items, reports = check_all_data(cfg, tokenizer, model.max_position_embeddings)
    if cfg.train_epochs is not None:  # passes over the kept rows, in whole steps
        cfg = dataclasses.replace(cfg, train_iters=max(1, math.ceil(
            cfg.train_epochs * len(train_items) / cfg.prompts_per_step)))
    initialize_distributed(cfg.parallel, model, seed=cfg.seed)
    share = rollout_share(cfg)
    if not torch.cuda.is_available():  # will it fit? (before anything big is allocated)
        fix_mmap_threshold(cfg.batching.cpu_mmap_threshold_kb)
        cfg = fit_cpu_memory(cfg, model, share is not None, train_items)
    # the verifier workers start (from a forkserver, in the background) before the model is
    # built; two verifier processes on the machine either way
    reward = (MathReward(num_workers=max(1, 2 // share.world),
                         extraction=cfg.reward.extraction) if share is not None else None)
    torch.manual_seed(cfg.seed)
    chunks = build_model(model, cfg.parallel, perform_initialization=cfg.load is None)
    ddp, optimizer, scheduler = build_training_state(chunks, cfg.optimizer, cfg.train_iters,
                                                     cfg.batching.updates_per_step)
    start, trainer_state = 0, {}
    ckpt = cfg.checkpoint.save
    if resume and ckpt and latest_iteration(ckpt) is not None:
        info = load_checkpoint(ckpt, ddp, optimizer, scheduler)
        start, trainer_state = info["iteration"], info["trainer_state"]
    elif cfg.load:
        load_checkpoint(cfg.load, ddp, refresh_optimizer=optimizer, load_rng=False)
    if ckpt and resume and start == 0 and torch.distributed.get_rank() == 0:
        logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", ckpt)
    eos_id = tokenizer.eos_token_id
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if torch.distributed.get_rank() == 0:
        for rep in reports.values():  # skipped rows are worth a warning
            (logger.warning if rep.skipped else logger.info)("data: %s", rep.summary())
    rollout = None
    if share is not None:
        data = PromptData(train_items, cfg.prompts_per_step, cfg.seed) if train_items else None
        evals = eval_items[:cfg.eval.max_problems] if cfg.eval.max_problems else eval_items
        # the HF engine without model_path starts with this architecture, unfilled: the
        # first weight sync below fills it
        engine = make_engine(dataclasses.replace(cfg.rollout, tokenizer_path=tokenizer_folder(cfg)),
                             weight_updates=True, hf_config=model_to_hf_config(model))
        rollout = RolloutSide(data, evals, engine, reward, share)
    engine = rollout.engine if rollout is not None else None
    sync = WeightSync(engine, model, cfg.rollout.resolved_weight_sync,
                      replicated=share is not None and share.world > 1,
                      bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 1024**2,
                      disk_dir=cfg.rollout.weight_sync_dir, address=cfg.rollout.weight_sync_address,
                      group_timeout_s=cfg.rollout.weight_sync_timeout_s,
                      keep_versions=cfg.rollout.weight_sync_keep_versions,
                      quantization=cfg.rollout.quantization,
                      fp8_block_size=cfg.rollout.fp8_block_size)
    sync.sync(ddp, str(start))  # the engine starts from exactly the trainer's weights
    run = Run(cfg, ddp, optimizer, scheduler, model, tokenizer, sync, eos_id, pad_id, stop_ids,
              rollout, {k: v for name, rep in reports.items() for k, v in rep.metrics(name).items()})
    return run, start, trainer_state


def fit_cpu_memory(cfg: TrainConfig, model, generates: bool, items) -> TrainConfig:
    """``cfg`` with the micro-batch budget the CPU memory plan leaves room for; refuses a run
    that cannot fit (train/cpu_memory.py)."""
    dp = ps.get_data_parallel_world_size()
    longest = max((len(it.prompt_ids) for it in items), default=0)
    # the ranks read the free memory at slightly different moments: agree on the least
    available = cfg.batching.cpu_memory_target_gb
    if available is None:
        free = torch.tensor([psutil.virtual_memory().available / 1024**3], dtype=torch.float64)
        torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
        available = 0.9 * float(free)
    plan = plan_cpu_memory(cfg, model, generates, dp, longest, speculative_levels(cfg),
                           available_gib=available)
    if torch.distributed.get_rank() == 0:
        logger.info("%s", plan.summary())
    cap = cfg.batching.cpu_max_tokens_per_microbatch
    if plan.microbatch_tokens == cap:
        return cfg
    if torch.distributed.get_rank() == 0:
        logger.warning("batching.cpu_max_tokens_per_microbatch %s -> %d: the activations of "
                       "larger micro-batches would not fit (%.1f GiB per rank)", cap,
                       plan.microbatch_tokens, plan.per_rank_gib)
    return dataclasses.replace(cfg, batching=dataclasses.replace(
        cfg.batching, cpu_max_tokens_per_microbatch=plan.microbatch_tokens))


def rollout_share(cfg: TrainConfig) -> Optional[RolloutShare]:
    """Which prompts this rank generates (None: none — it waits for the generating rank).
    Data-parallel rollouts (``rollout.data_parallel``, auto with the HF engine) need every rank
    to hold the whole model: TP = PP = CP = 1."""
    whole = (ps.get_tensor_model_parallel_world_size() == 1
             and ps.get_pipeline_model_parallel_world_size() == 1
             and ps.get_context_parallel_world_size() == 1)
    wanted = cfg.rollout.data_parallel
    if wanted and not whole:
        raise ConfigError("rollout.data_parallel=true needs every rank to hold the whole model "
                          f"(tensor/pipeline/context parallel sizes 1; got "
                          f"{ps.get_tensor_model_parallel_world_size()}/"
                          f"{ps.get_pipeline_model_parallel_world_size()}/"
                          f"{ps.get_context_parallel_world_size()})")
    dp = ps.get_data_parallel_world_size()
    if dp > 1 and whole and (wanted or (wanted is None and cfg.rollout.engine == "hf")):
        return RolloutShare(ps.get_data_parallel_rank(), dp)
    return RolloutShare(0, 1) if torch.distributed.get_rank() == 0 else None


def evaluate(run: Run, step: int) -> Dict[str, float]:
    """Held-out accuracy (the generating ranks generate and grade their share; every rank
    returns the result). Prompts are rendered as for training (``data.prompts.prompt_ids``)
    and answers graded as ``megatron-trapo eval`` grades them (``reward.grading``:
    math-verify, then PRM800K's grader), in the reward's worker pool. Every graded response
    is appended to ``log_dir/eval_samples.jsonl`` (per-problem comparisons between runs)."""
    synced = run.sync_engine()  # the weights of a method that does not generate (SFT)
    side = run.rollout
    local = [] if side is not None else None
    if side is not None and side.eval_items:
        mine = side.share.indices(len(side.eval_items))
        items = [side.eval_items[i] for i in mine]
        k = run.cfg.eval.k  # sample j of problem i: seed + i·k + j, however it is sharded
        reqs = [RolloutRequest(it.prompt_ids, SamplingParams(
            temperature=run.cfg.eval.temperature, max_new_tokens=run.cfg.loss.max_response_length,
            stop_token_ids=run.stop_ids, seed=run.cfg.seed + i * k, n=k))
            for i, it in zip(mine, items)]
        samples = [(s, it) for group, it in zip(side.engine.generate(reqs), items) for s in group]
        texts = [run.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s, _ in samples]
        grades = grade_all(side.reward,
                           [(t, it.record.answer) for t, (_, it) in zip(texts, samples)])
        local = [(float(g["correct"]), len(s.token_ids), g["grader"], it.record.source,
                  it.record.id, text) for g, (s, it), text in zip(grades, samples, texts)]
    rows = gather_shares(local, side.share if side is not None else None)
    if not rows:
        return synced
    n = len(rows)
    metrics = {**synced, "eval/accuracy": sum(r[0] for r in rows) / n,
               "eval/length": sum(r[1] for r in rows) / n,
               "eval/no_answer": sum(r[2] == "no_answer" for r in rows) / n,
               "eval/second_grader": sum(r[2] == "prm800k" for r in rows) / n}
    if run.cfg.log_dir and torch.distributed.get_rank() == 0:
        write_eval_samples(Path(run.cfg.log_dir) / "eval_samples.jsonl", step, rows)
    by_source: Dict[str, List[float]] = {}
    for score, _, _, source, _, _ in rows:  # e.g. accuracy per difficulty
        if source:
            by_source.setdefault(source, []).append(score)
    if len(by_source) > 1:
        metrics.update({f"eval/accuracy/{k}": sum(v) / len(v) for k, v in by_source.items()})
    if run.cfg.eval.average == "sources" and by_source:
        if len(by_source) != len({r[3] for r in rows}):  # a record without a source
            raise ConfigError("eval.average=sources needs a source on every record of "
                              f"eval.data ({run.cfg.eval.data})")
        metrics["eval/accuracy"] = sum(sum(v) / len(v) for v in by_source.values()) / len(
            by_source)
    return metrics


def write_eval_samples(path: Path, step: int, rows) -> None:
    """One JSON line per graded held-out response (a resumed run first cuts the file back to
    its checkpoint's step, as the metrics: :func:`megatron_trapo.metrics.continue_log`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for correct, length, grader, source, rid, text in rows:
            f.write(json.dumps({"step": step, "id": rid, "source": source, "correct": correct,
                                "length": length, "grader": grader, "text": text}) + "\n")


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False
                 ) -> Dict[str, float]:
    """Train; a pipeline (``loss_mode=sft_then_rl``: an SFT stage, then a GRPO stage from its
    checkpoint) runs its stages in order, each with its own checkpoint and log folder (``sft/``,
    ``rl/``) and the settings of :func:`stage_config`; a finished earlier stage is kept.
    ``overwrite``: a fresh run may replace the run in ``checkpoint.save``."""
    if not is_pipeline(cfg.loss.loss_mode):
        return _run_stage(cfg, resume, overwrite)
    if not cfg.checkpoint.save:
        raise ConfigError(f"loss_mode={cfg.loss.loss_mode} needs checkpoint.save (each stage "
                          "loads the previous stage's checkpoint)")
    root = Path(cfg.checkpoint.save)
    data = stage_data(cfg, root)
    load, final = cfg.load, {}
    parts = PIPELINES[cfg.loss.loss_mode]
    for k, part in enumerate(parts):
        done = root / part.folder / STAGE_DONE
        if k + 1 < len(parts) and done.is_file() and not overwrite:  # finished: kept
            load = str(root / part.folder)
            continue
        final = _run_stage(stage_config(cfg, part, load, data.get(part.folder)), resume,
                           overwrite, control_dir=str(root))
        if int(os.environ.get("RANK", "0")) == 0:
            done.write_text(json.dumps({"iteration": latest_iteration(root / part.folder)}))
        load = str(root / part.folder)
    return final


STAGE_DONE = "stage_done.json"  # written in a stage's checkpoint folder when it finished


def stage_data(cfg: TrainConfig, root: Path) -> Dict[str, str]:
    """Each stage's training file, by stage folder: ``sft_stage.train_data`` for the SFT
    stage, or with ``sft_stage.split`` a seeded share of ``train_data`` for it and the
    complement for RL (written under ``checkpoint.save/data``); empty: the run's train_data."""
    sft = cfg.sft_stage
    if sft.train_data is not None:
        return {"sft": sft.train_data}
    if sft.split is None or cfg.train_data is None:
        return {}
    first, rest, bad = split_rows(cfg.train_data, sft.split, cfg.seed, root / "data")
    if bad and int(os.environ.get("RANK", "0")) == 0:
        logger.warning("sft_stage.split: %d unreadable line(s) of %s left out of both parts",
                       bad, cfg.train_data)
    return {"sft": str(first), "rl": str(rest)}


def stage_config(cfg: TrainConfig, part: Stage, load: Optional[str],
                 data: Optional[str]) -> TrainConfig:
    """The run's config for one stage: its method, checkpoint and log sub-folders, its data;
    a stage with settings of its own (the SFT stage: ``sft_stage``) takes its batch, length,
    optimizer and one update per batch from them."""
    logs = Path(cfg.log_dir) if cfg.log_dir else None
    common = dict(loss=dataclasses.replace(cfg.loss, loss_mode=part.method), load=load,
                  checkpoint=dataclasses.replace(cfg.checkpoint,
                                                 save=str(Path(cfg.checkpoint.save) / part.folder)),
                  log_dir=str(logs / part.folder) if logs else None,
                  train_data=data or cfg.train_data)
    if part.settings is None:
        return dataclasses.replace(cfg, **common)
    own = getattr(cfg, part.settings)
    return dataclasses.replace(
        cfg, **common, optimizer=own.optimizer, prompts_per_step=own.prompts_per_step,
        train_iters=own.train_iters or 1, train_epochs=None if own.train_iters else own.epochs,
        batching=dataclasses.replace(cfg.batching, ppo_mini_batches=1, ppo_epochs=1))


def _run_stage(cfg: TrainConfig, resume: bool, overwrite: bool = False,
               control_dir: Optional[str] = None) -> Dict[str, float]:
    """One training run. ``control_dir``: where the stop file and ``preempted.json`` live (the
    run's top checkpoint folder; for sft_then_rl the same for both stages)."""
    # its settings are checked with the preflight's, before any model is built
    profiler = StepProfiler(cfg.profiling, cfg.log_dir, int(os.environ.get("RANK", "0")))
    run, start, _ = setup(cfg, resume, overwrite)
    cfg = run.cfg  # train_epochs resolved to train_iters
    rank0 = torch.distributed.get_rank() == 0
    if rank0 and cfg.log_dir:  # the log continues at the resumed step, without repeated rows
        continue_log(Path(cfg.log_dir) / "metrics.jsonl", start)
        continue_log(Path(cfg.log_dir) / "eval_samples.jsonl", start)
    metrics = MetricsLogger(cfg.log_dir, enabled=rank0, config=to_dict(cfg))
    final: Dict[str, float] = {}
    has_eval = cfg.eval.data is not None  # known on every rank (items live on rank 0)

    def save(iteration: int) -> None:
        save_checkpoint(cfg.checkpoint.save, iteration, run.ddp, run.optimizer, run.scheduler,
                        trainer_state={"iteration": iteration},
                        config={"model": dataclasses.asdict(run.model)},
                        keep_last=cfg.checkpoint.keep_last,
                        optim_metadata=checkpoint_optimizer_metadata(cfg.checkpoint))

    if start == 0 and has_eval and cfg.eval.at_start:
        final = evaluate(run, 0)
        metrics.log(0, final)
    run.timers.take(0.0)  # set-up and the first evaluation are not a step's
    t_iteration = time.time()  # an iteration: from one metrics row to the next
    bar = tqdm(range(start, cfg.train_iters), disable=not rank0, initial=start,
               total=cfg.train_iters, desc=cfg.loss.loss_mode, unit="step")
    with StopRequest(control_dir or cfg.checkpoint.save) as stop, profiler:
        for step in bar:
            profiler.before(step)
            t0 = time.time()
            m = trapo_step(run, step).metrics
            if step == 0:
                m.update(run.data_metrics)
            m["step_time_s"] = time.time() - t0
            m["train/tokens_per_s"] = m.get("train/tokens", 0.0) / max(m["step_time_s"], 1e-9)
            m["memory/peak_gb"] = peak_memory_gb()
            last = step + 1 == cfg.train_iters
            if has_eval and (last or (cfg.eval.interval and (step + 1) % cfg.eval.interval == 0)):
                with run.timers.phase("eval"):
                    m.update(evaluate(run, step + 1))
            # timings cover the whole iteration since the last row (the checkpoint saved
            # after the previous row included)
            now = time.time()
            m.update(run.timers.take(now - t_iteration))
            t_iteration = now
            metrics.log(step + 1, m)
            profiler.after(step)
            final = m
            bar.set_postfix(postfix(m))
            interval = cfg.checkpoint.save_interval
            saved = bool(cfg.checkpoint.save) and (last or bool(interval and
                                                                (step + 1) % interval == 0))
            if saved:
                with run.timers.phase("checkpoint"):
                    save(step + 1)
            reason = None if last else stop.agreed()
            if reason is not None:  # preempted: this step is done; save it and stop
                if cfg.checkpoint.save and not saved:
                    save(step + 1)
                stop.record(step + 1, reason, bool(cfg.checkpoint.save))
                metrics.close()
                run.close()
                bar.close()
                raise Preempted(step + 1, reason, bool(cfg.checkpoint.save))
    metrics.close()

    if importlib.util.find_spec("matplotlib") is None:  # e.g. a bare GPU image: JSONL only
        logger.warning("matplotlib is not installed: no curves.png")
    elif rank0 and cfg.log_dir and (Path(cfg.log_dir) / "metrics.jsonl").is_file():
        plot_curves(Path(cfg.log_dir) / "metrics.jsonl", Path(cfg.log_dir) / "curves.png",
                    title=cfg.loss.loss_mode)
    run.close()
    return final
