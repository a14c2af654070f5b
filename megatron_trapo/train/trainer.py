"""The training run around :func:`megatron_trapo.train.step.trapo_step`: set-up (layout, model,
optimizer, tokenizer, data, engine, reward, weight sync), the loop with progress bar, metrics,
periodic checkpoints and held-out evaluation, exact resume, and the training-curve PNG."""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_trapo.config import ConfigError, TrainConfig, runtime_model, to_dict

logger = logging.getLogger(__name__)


class PromptData:
    """Training prompts in a fixed, seeded order: step k's prompts depend only on (seed, k), so
    the data position of a resumed run is its step."""

    def __init__(self, items: list, prompts_per_step: int, seed: int):
        if not items:
            raise ConfigError("train_data holds no usable records")
        self.items, self.n, self.seed = items, prompts_per_step, seed

    def batch(self, step: int) -> list:
        out = []
        for k in range(step * self.n, (step + 1) * self.n):
            epoch, pos = divmod(k, len(self.items))
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            out.append(self.items[order[pos]])
        return out


@dataclass
class Run:
    cfg: TrainConfig
    ddp: list
    optimizer: object
    scheduler: object
    model: object
    tokenizer: object
    data: Optional[PromptData]
    eval_items: list
    engine: object
    reward: object
    sync: object
    eos_id: int
    pad_id: int
    stop_ids: List[int]
    data_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)  # rows kept/skipped


def setup(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> tuple:
    from megatron_trapo.data.tokenizer import stop_token_ids
    from megatron_trapo.models.hf.mapping import model_to_hf_config
    from megatron_trapo.models.pretrained import model_config_from_checkpoint
    from megatron_trapo.models.provider import build_model
    from megatron_trapo.platform.distributed import initialize_distributed
    from megatron_trapo.reward.math_reward import MathReward
    from megatron_trapo.rollout import make_engine
    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.weight_sync import WeightSync
    from megatron_trapo.train.checkpoint import latest_iteration, load_checkpoint
    from megatron_trapo.train.optimizer import build_training_state
    from megatron_trapo.train.preflight import (check_all_data, check_paths, load_tokenizer,
                                                tokenizer_folder)

    # preflight, on every rank and before any model is built: paths, tokenizer, data rows
    check_paths(cfg, resume, overwrite)
    model = runtime_model(model_config_from_checkpoint(cfg.load), cfg.model) if cfg.load \
        else cfg.model
    tokenizer = load_tokenizer(cfg)
    train_items, eval_items, reports = check_all_data(cfg, tokenizer, model.max_position_embeddings)
    initialize_distributed(cfg.parallel, model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    chunks = build_model(model, cfg.parallel, perform_initialization=cfg.load is None)
    ddp, optimizer, scheduler = build_training_state(chunks, cfg.optimizer, cfg.train_iters)
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
    rank0 = torch.distributed.get_rank() == 0
    data = evals = None
    engine = reward = None
    if rank0:
        for rep in reports.values():  # skipped rows are worth a warning
            (logger.warning if rep.skipped else logger.info)("data: %s", rep.summary())
        data = PromptData(train_items, cfg.prompts_per_step, cfg.seed) if train_items else None
        evals = eval_items
        if cfg.eval_max_problems:
            evals = evals[:cfg.eval_max_problems]
        if cfg.rollout.engine == "hf" and not cfg.rollout.model_path:
            engine = HFEngine.from_hf_config(model_to_hf_config(model), device=cfg.rollout.device,
                                             max_batch_size=cfg.rollout.max_batch_size)
        else:
            engine = make_engine(dataclasses.replace(cfg.rollout,
                                                     tokenizer_path=tokenizer_folder(cfg)),
                                 weight_updates=True)
        reward = MathReward(num_workers=2)
    sync = WeightSync(engine, model, cfg.rollout.resolved_weight_sync,
                      bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 1024**2,
                      disk_dir=cfg.rollout.weight_sync_dir, address=cfg.rollout.weight_sync_address,
                      group_timeout_s=cfg.rollout.weight_sync_timeout_s,
                      keep_versions=cfg.rollout.weight_sync_keep_versions)
    sync.sync(ddp, str(start))  # the engine starts from exactly the trainer's weights
    run = Run(cfg, ddp, optimizer, scheduler, model, tokenizer, data, evals or [], engine, reward,
              sync, eos_id, pad_id, stop_ids,
              {k: v for name, rep in reports.items() for k, v in rep.metrics(name).items()})
    return run, start, trainer_state


def evaluate(run: Run) -> Dict[str, float]:
    """Held-out accuracy (rank 0 generates and scores; every rank returns the result)."""
    from megatron_trapo.rollout.types import RolloutRequest, SamplingParams

    result = [None]
    if torch.distributed.get_rank() == 0 and run.eval_items:
        reqs = [RolloutRequest(it.prompt_ids, SamplingParams(
            temperature=run.cfg.eval_temperature, max_new_tokens=run.cfg.loss.max_response_length,
            stop_token_ids=run.stop_ids, seed=run.cfg.seed + i)) for i, it in enumerate(run.eval_items)]
        samples = run.engine.generate(reqs)
        texts = [run.tokenizer.decode(s[0].token_ids, skip_special_tokens=True) for s in samples]
        scores = run.reward.score([(t, it.record.answer) for t, it in zip(texts, run.eval_items)])
        metrics = {"eval/accuracy": sum(scores) / len(scores),
                   "eval/length": sum(len(s[0].token_ids) for s in samples) / len(samples)}
        by_source: Dict[str, List[float]] = {}
        for it, score in zip(run.eval_items, scores):  # e.g. accuracy per difficulty
            if it.record.source:
                by_source.setdefault(it.record.source, []).append(score)
        if len(by_source) > 1:
            metrics.update({f"eval/accuracy/{k}": sum(v) / len(v) for k, v in by_source.items()})
        result = [metrics]
    from megatron_trapo.platform.distributed import host_group

    torch.distributed.broadcast_object_list(result, src=0, group=host_group())
    return result[0] or {}


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process (CUDA), else its resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False
                 ) -> Dict[str, float]:
    """Train; ``loss_mode=sft_then_rl`` chains an SFT stage and a GRPO stage from its
    checkpoint (each with its own checkpoint and log folder, ``sft/`` and ``rl/``).
    ``overwrite``: a fresh run may replace the run in ``checkpoint.save``."""
    if cfg.loss.loss_mode != "sft_then_rl":
        return _run_stage(cfg, resume, overwrite)
    if not cfg.checkpoint.save:
        raise ConfigError("loss_mode=sft_then_rl needs checkpoint.save (the RL stage loads "
                          "the SFT stage's checkpoint)")
    root = Path(cfg.checkpoint.save)
    logs = Path(cfg.log_dir) if cfg.log_dir else None
    stage = lambda name, mode, iters, load: dataclasses.replace(  # noqa: E731
        cfg, loss=dataclasses.replace(cfg.loss, loss_mode=mode), train_iters=iters, load=load,
        checkpoint=dataclasses.replace(cfg.checkpoint, save=str(root / name)),
        log_dir=str(logs / name) if logs else None)
    from megatron_trapo.train.checkpoint import latest_iteration

    sft_cfg = stage("sft", "sft", cfg.sft_stage_iters, cfg.load)
    if latest_iteration(root / "sft") != cfg.sft_stage_iters:  # a finished stage is kept
        _run_stage(sft_cfg, resume, overwrite, control_dir=str(root))
    rl = stage("rl", "grpo", cfg.train_iters, str(root / "sft"))
    return _run_stage(rl, resume, overwrite, control_dir=str(root))


def _run_stage(cfg: TrainConfig, resume: bool, overwrite: bool = False,
               control_dir: Optional[str] = None) -> Dict[str, float]:
    """One training run. ``control_dir``: where the stop file and ``preempted.json`` live (the
    run's top checkpoint folder; for sft_then_rl the same for both stages)."""
    from tqdm import tqdm

    from megatron_trapo.metrics import MetricsLogger, continue_log
    from megatron_trapo.plotting import plot_curves
    from megatron_trapo.train.checkpoint import save_checkpoint
    from megatron_trapo.train.preemption import Preempted, StopRequest
    from megatron_trapo.train.step import trapo_step

    run, start, _ = setup(cfg, resume, overwrite)
    rank0 = torch.distributed.get_rank() == 0
    if rank0 and cfg.log_dir:  # the log continues at the resumed step, without repeated rows
        continue_log(Path(cfg.log_dir) / "metrics.jsonl", start)
    metrics = MetricsLogger(cfg.log_dir, enabled=rank0, config=to_dict(cfg))
    final: Dict[str, float] = {}
    has_eval = cfg.eval_data is not None  # known on every rank (items live on rank 0)

    def save(iteration: int) -> None:
        save_checkpoint(cfg.checkpoint.save, iteration, run.ddp, run.optimizer, run.scheduler,
                        trainer_state={"iteration": iteration},
                        config={"model": dataclasses.asdict(run.model)},
                        keep_last=cfg.checkpoint.keep_last,
                        optim_metadata=cfg.checkpoint.optimizer_metadata())

    if start == 0 and has_eval:
        final = evaluate(run)
        metrics.log(0, final)
    bar = tqdm(range(start, cfg.train_iters), disable=not rank0, initial=start,
               total=cfg.train_iters, desc=cfg.loss.loss_mode, unit="step")
    with StopRequest(control_dir or cfg.checkpoint.save) as stop:
        for step in bar:
            t0 = time.time()
            m = trapo_step(run, step)
            if step == 0:
                m.update(run.data_metrics)
            m["step_time_s"] = time.time() - t0
            m["train/tokens_per_s"] = m.get("train/tokens", 0.0) / max(m["step_time_s"], 1e-9)
            m["memory/peak_gb"] = peak_memory_gb()
            last = step + 1 == cfg.train_iters
            if has_eval and (last or (cfg.eval_interval and (step + 1) % cfg.eval_interval == 0)):
                m.update(evaluate(run))
            metrics.log(step + 1, m)
            final = m
            bar.set_postfix(loss=f"{m.get('loss', 0):.4f}",
                            reward=f"{m.get('rollout/reward_unguided', float('nan')):.2f}")
            interval = cfg.checkpoint.save_interval
            saved = bool(cfg.checkpoint.save) and (last or bool(interval and
                                                                (step + 1) % interval == 0))
            if saved:
                save(step + 1)
            reason = None if last else stop.agreed()
            if reason is not None:  # preempted: this step is done; save it and stop
                if cfg.checkpoint.save and not saved:
                    save(step + 1)
                stop.record(step + 1, reason, bool(cfg.checkpoint.save))
                metrics.close()
                if run.reward is not None:
                    run.reward.close()
                bar.close()
                raise Preempted(step + 1, reason, bool(cfg.checkpoint.save))
    metrics.close()
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # e.g. a bare GPU image: JSONL only
        logger.warning("matplotlib is not installed: no curves.png")
    elif rank0 and cfg.log_dir and (Path(cfg.log_dir) / "metrics.jsonl").is_file():
        plot_curves(Path(cfg.log_dir) / "metrics.jsonl", Path(cfg.log_dir) / "curves.png",
                    title=cfg.loss.loss_mode)
    if run.reward is not None:
        run.reward.close()
    return final
