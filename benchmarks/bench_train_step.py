"""Prints the speed of the training hot paths at several layouts: one training step
(forward + backward + optimizer) and a checkpoint save + load. Run under torchrun:

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_train_step.py

Prints one line per layout (rank 0): step time (median of N), tokens/s, save and load seconds,
peak RSS of rank 0.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.config import ConfigError, OptimizerConfig, ParallelConfig, SmokeConfig
from megatron_trapo.models.presets import num_parameters, preset
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform.distributed import initialize_distributed, validate_layout
from megatron_trapo.train.checkpoint import load_checkpoint, save_checkpoint
from megatron_trapo.train.forward_backward import train_step
from megatron_trapo.train.lm_loss import lm_forward_step
from megatron_trapo.train.optimizer import build_training_state
from megatron_trapo.train.smoke import progression_batch


def bench(layout: dict, model_name: str, steps: int, root: str) -> None:
    model = preset(model_name)
    cfg = SmokeConfig(model=model, seq_length=128, micro_batch_size=4, num_microbatches=4)
    par = ParallelConfig(**layout)
    lay = initialize_distributed(par, model, seed=1)
    chunks = build_model(model, par)
    state = build_training_state(chunks, OptimizerConfig(lr=1e-4), steps)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        train_step(*state, progression_batch(step, 0, cfg), lm_forward_step, cfg.seq_length,
                   cfg.micro_batch_size)
        times.append(time.perf_counter() - t0)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    save_checkpoint(root, steps, *state)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(root, *state)
    load_s = time.perf_counter() - t0
    step_s = statistics.median(times[1:] or times)
    tokens = cfg.num_microbatches * cfg.micro_batch_size * cfg.seq_length * lay.dp
    if torch.distributed.get_rank() == 0:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{model_name:>10} {num_parameters(model)/1e6:7.1f}M  tp={lay.tp} pp={lay.pp} "
              f"dp={lay.dp} sp={int(lay.sequence_parallel)}  step {step_s*1000:8.1f} ms  "
              f"{tokens/step_s:9.0f} tok/s  save {save_s:5.2f} s  load {load_s:5.2f} s  "
              f"peak RSS {rss:7.0f} MiB", flush=True)


def main() -> None:
    quiet_known_warnings()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layouts = [dict()]
    if world >= 2:
        layouts += [dict(tensor_model_parallel_size=2),
                    dict(tensor_model_parallel_size=2, sequence_parallel=True),
                    dict(pipeline_model_parallel_size=2)]
    base = os.environ.get("BENCH_CKPT_DIR", tempfile.gettempdir())
    for i, layout in enumerate(layouts):
        try:
            validate_layout(ParallelConfig(**layout), world, preset(args.model))
        except ConfigError as exc:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{args.model:>10} {layout}: skipped ({exc})", flush=True)
            continue
        root = os.path.join(base, f"megatron_trapo_bench_{i}")  # shared by all ranks
        bench(layout, args.model, args.steps, root)
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # the checkpoint writer re-imports __main__
    main()
