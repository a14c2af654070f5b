"""The language-model smoke job: a tiny GPT learns arithmetic progressions on Megatron-Core.

Until the TRAPO trainer lands this is the README's main command: it runs the whole stack
below it — layout validation, process groups, model, DDP, optimizer, pipeline schedule,
checkpoints, resume, metrics — on CPU (gloo) or GPU (NCCL) alike. Each sample is
``a, a+d, a+2d, … (mod V)``; the loss falls once the model infers ``d`` from the prefix.
The data of step k on data-parallel rank r depends only on (seed, k, r), so a resumed run
sees exactly the stream an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_trapo.config import SmokeConfig, save_yaml, to_dict
from megatron_trapo.metrics import MetricsLogger
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform import compute_device
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.batch import to_device
from megatron_trapo.train.checkpoint import (checkpoint_optimizer_metadata, latest_iteration,
                                             load_checkpoint, save_checkpoint)
from megatron_trapo.train.forward_backward import train_step
from megatron_trapo.train.lm_loss import lm_forward_step, shift_batch
from megatron_trapo.train.optimizer import build_training_state

logger = logging.getLogger(__name__)


def progression_batch(step: int, dp_rank: int, cfg: SmokeConfig) -> List[Dict[str, torch.Tensor]]:
    """The micro-batches of one step for one data-parallel rank."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dp_rank)
    n, b, s, vocab = cfg.num_microbatches, cfg.micro_batch_size, cfg.seq_length, cfg.model.vocab_size
    start = torch.randint(0, vocab, (n, b, 1), generator=g)
    stride = torch.randint(1, 8, (n, b, 1), generator=g)
    tokens = (start + stride * torch.arange(s + 1)) % vocab
    return [shift_batch(t) for t in tokens]


def _global_loss(losses) -> float:
    """Token-mean loss over the whole step (all data-parallel ranks)."""
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    owner = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
             and ps.get_context_parallel_rank() == 0)
    if owner and losses:
        total += torch.stack([d["lm loss"] for d in losses]).sum(0).double()
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def run_smoke(cfg: SmokeConfig, resume: bool = False) -> Dict[str, float]:
    """Train ``cfg.train_iters`` steps; returns the first and last losses."""
    layout = initialize_distributed(cfg.parallel, cfg.model, seed=cfg.seed,
                                    seq_length=cfg.seq_length)
    rank = torch.distributed.get_rank()
    torch.manual_seed(cfg.seed)
    chunks = build_model(cfg.model, cfg.parallel)
    ddp, optimizer, scheduler = build_training_state(chunks, cfg.optimizer, cfg.train_iters)

    start = 0
    ckpt_root = cfg.checkpoint.save  # --resume continues the run in it
    if resume:
        if ckpt_root is None or latest_iteration(ckpt_root) is None:
            if rank == 0:
                logger.warning("--resume: no checkpoint under %s; starting from scratch", ckpt_root)
        else:
            info = load_checkpoint(ckpt_root, ddp, optimizer, scheduler)
            start = int(info["trainer_state"].get("iteration", info["iteration"]))
    metrics = MetricsLogger(cfg.log_dir, enabled=(rank == 0), config=to_dict(cfg))
    if rank == 0 and cfg.log_dir:
        save_yaml(cfg, Path(cfg.log_dir) / "config.yaml")
        print(f"layout: world={layout.world_size} tp={layout.tp} pp={layout.pp} "
              f"vpp={layout.vpp} cp={layout.cp} dp={layout.dp} sp={layout.sequence_parallel}")

    dp_rank = ps.get_data_parallel_rank()
    tokens_per_step = cfg.num_microbatches * cfg.micro_batch_size * cfg.seq_length * layout.dp
    first = last = float("nan")
    bar = tqdm(range(start, cfg.train_iters), disable=(rank != 0), desc="smoke", unit="step",
               initial=start, total=cfg.train_iters)
    for step in bar:
        t0 = time.time()
        mbs = [to_device(mb) for mb in progression_batch(step, dp_rank, cfg)]
        out = train_step(ddp, optimizer, scheduler, mbs, lm_forward_step, cfg.seq_length,
                         cfg.micro_batch_size)
        loss = _global_loss(out["losses"])
        elapsed = time.time() - t0
        first = loss if step == start else first
        last = loss
        if (step + 1) % cfg.log_interval == 0:
            metrics.log(step + 1, {"loss": loss, "grad_norm": out["grad_norm"] or 0.0,
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "tokens_per_s": tokens_per_step / max(elapsed, 1e-9),
                                   "step_time_s": elapsed})
            bar.set_postfix(loss=f"{loss:.3f}")
        interval = cfg.checkpoint.save_interval
        is_last = step + 1 == cfg.train_iters
        if cfg.checkpoint.save and ((interval and (step + 1) % interval == 0) or is_last):
            save_checkpoint(cfg.checkpoint.save, step + 1, ddp, optimizer, scheduler,
                            trainer_state={"iteration": step + 1}, config=to_dict(cfg),
                            keep_last=cfg.checkpoint.keep_last,
                            optim_metadata=checkpoint_optimizer_metadata(cfg.checkpoint))
    metrics.close()
    return {"first_loss": first, "last_loss": last, "start_iteration": start}
