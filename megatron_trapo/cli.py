"""``megatron-trapo`` command line: ``train``, ``launch`` (servers + trainer as one job),
``eval`` (and its Slurm parts), ``smoke`` (a language-model training check on Megatron-Core) and ``layout``.

Launch multi-process jobs under torchrun, e.g.
``torchrun --nproc-per-node 2 -m megatron_trapo.cli smoke parallel.tensor_model_parallel_size=2``.
Bad configuration exits with status 2 and one line naming the field, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from megatron_trapo.config import ConfigError, SmokeConfig, TrainConfig, load_config, print_error
from megatron_trapo.eval.commands import add_parsers
from megatron_trapo.eval.commands import run as run_eval
from megatron_trapo.launch.job import build_job, run_job
from megatron_trapo.launch.plan import build_plan, render, resolve_model
from megatron_trapo.platform import parent_guard, quiet_known_warnings
from megatron_trapo.platform.distributed import destroy_distributed, validate_layout
from megatron_trapo.train.preemption import PREEMPTED_EXIT, Preempted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-trapo", description="TRAPO post-training on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="train a tiny GPT on a synthetic task (a Megatron-Core check)")
    smoke.add_argument("--config", help="YAML file (SmokeConfig fields)")
    smoke.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in checkpoint.save/load")
    smoke.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train_iters=10")
    train = sub.add_parser("train", help="TRAPO / GRPO / SFT / LUFFY training")
    train.add_argument("--config", help="YAML file (TrainConfig fields)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in checkpoint.save")
    train.add_argument("--overwrite", action="store_true",
                       help="start over even though checkpoint.save holds a run (it is removed)")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    add_parsers(sub)
    launch = sub.add_parser("launch", help="run a whole job: inference servers on their nodes, "
                            "then the trainer (inside a Slurm allocation, or on this machine)")
    launch.add_argument("--config", help="YAML file (TrainConfig fields, launch.* for placement)")
    launch.add_argument("--resume", action="store_true", help="passed to the trainer")
    launch.add_argument("--overwrite", action="store_true", help="passed to the trainer")
    launch.add_argument("--dry-run", action="store_true",
                        help="print the placement and every command line; start nothing")
    launch.add_argument("--hosts", help="comma-separated hosts (default: the Slurm allocation's, "
                        "or this machine)")
    launch.add_argument("overrides", nargs="*", help="key=value overrides")
    plan = sub.add_parser("plan", help="resolve a job without a GPU: placement, ranks, "
                          "micro-batching, per-GPU memory per pipeline stage; exit 1 if it "
                          "does not fit")
    plan.add_argument("--config", help="YAML file (TrainConfig fields)")
    plan.add_argument("--nodes", type=int, help="nodes of the job (default: trainer nodes + 1)")
    plan.add_argument("--gpus-per-node", type=int, help="overrides launch.gpus_per_node")
    plan.add_argument("--gpu", help="overrides launch.gpu (h100-80gb, h200, a100-80gb, …)")
    plan.add_argument("--prompt-tokens", type=int, default=1024,
                      help="longest prompt (the paper filters prompts to 1024 tokens)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    layout = sub.add_parser("layout", help="validate a training config's parallel layout for a "
                                           "world size")
    layout.add_argument("--world-size", type=int, required=True)
    layout.add_argument("--config", help="YAML file (TrainConfig fields, as for train)")
    layout.add_argument("overrides", nargs="*")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    # key=value overrides may come between options (`eval --slurm k=4 --wait`): argparse stops
    # a nargs="*" positional at the first option, so the rest arrive as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    quiet_known_warnings()
    if args.command in ("train", "smoke"):  # under torchrun: exit when torchrun dies
        parent_guard.start()
    if args.command == "train":
        return _train(args)
    if args.command == "launch":
        return _launch(args)
    if args.command == "plan":
        return _plan(args)
    if args.command.startswith("eval"):
        return run_eval(args)
    try:
        if args.command == "layout":
            return _layout(args)
        cfg = load_config(SmokeConfig, args.config, args.overrides)
        validate_layout(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")), cfg.model,
                        cfg.seq_length)
    except ConfigError as exc:
        print_error(exc)
        return 2
    # lazy: the smoke trainer imports megatron-core (~3 s); other subcommands do not need it
    from megatron_trapo.train.smoke import run_smoke

    result = run_smoke(cfg, resume=args.resume)
    if torch.distributed.get_rank() == 0:
        print(f"smoke done: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} "
              f"(started at iteration {result['start_iteration']})")
    destroy_distributed()
    return 0


def _plan(args) -> int:
    overrides = list(args.overrides)
    if args.gpus_per_node:
        overrides.append(f"launch.gpus_per_node={args.gpus_per_node}")
    if args.gpu:
        overrides.append(f"launch.gpu={args.gpu}")
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        plan = build_plan(cfg, args.nodes, args.prompt_tokens)
    except ConfigError as exc:
        print_error(exc)
        return 2
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0 if plan["fits"] else 1


def _launch(args) -> int:
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        job = build_job(cfg, args.config, args.overrides, hosts=args.hosts, resume=args.resume,
                        overwrite=args.overwrite)
        print(job.describe(), flush=True)
        try:  # the memory plan of this very placement (an estimate: it warns, never blocks)
            plan = build_plan(cfg, hosts=job.hosts)
            print(render(plan), flush=True)
        except ConfigError as exc:
            print(f"plan: not estimated ({exc})", flush=True)
        if args.dry_run:
            return 0
        return run_job(job)
    except ConfigError as exc:
        print_error(exc)
        return 2


def _layout(args) -> int:
    """The layout a training config would run at ``--world-size`` processes, for the
    architecture ``plan`` uses (``load=`` when readable here, else ``launch.model_preset``, else
    ``model``)."""
    cfg = load_config(TrainConfig, args.config, args.overrides)
    model, source = resolve_model(cfg)
    lay = validate_layout(cfg.parallel, args.world_size, model)
    print(f"ok: world={lay.world_size} tp={lay.tp} pp={lay.pp} vpp={lay.vpp} "
          f"cp={lay.cp} dp={lay.dp} sp={lay.sequence_parallel} (architecture: {source})")
    return 0


def _train(args) -> int:
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if cfg.load is None:
            validate_layout(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")), cfg.model)
        # lazy: the trainer imports megatron-core (~3 s) and transformers; a config error is
        # reported before either loads, and other subcommands never load them
        from megatron_trapo.train.trainer import run_training

        final = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        print_error(exc)
        return 2
    except Preempted as exc:  # a clean stop: the launcher / the Slurm script requeues on 75
        if torch.distributed.get_rank() == 0:
            print(f"megatron-trapo: {exc}", file=sys.stderr, flush=True)
        destroy_distributed()
        return PREEMPTED_EXIT
    if torch.distributed.get_rank() == 0:
        print(json.dumps({k: round(v, 5) for k, v in final.items()
                          if isinstance(v, float)}))
    destroy_distributed()
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports __main__
    sys.exit(main())
