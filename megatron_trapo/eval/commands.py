"""The ``megatron-trapo eval*`` commands (see ``megatron_trapo/cli.py`` for the parser).

- ``eval``: plan, then run every shard here, or ``--slurm``: submit the array and the
  aggregation job (``--wait``: follow them and print the summary or the missing shards);
- ``eval-shard DIR I``: array task I; ``eval-aggregate DIR``: the summary;
- ``eval-resubmit DIR``: the shards without results, and a new aggregation job;
- ``eval-convert DIR``: the conversion job (Megatron checkpoint → HF).
"""
from __future__ import annotations

import json
import sys

from megatron_trapo.config import ConfigError, EvalConfig, load_config, print_error


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="benchmark evaluation (locally or as a Slurm job array)")
    ev.add_argument("--config", help="YAML file (EvalConfig fields)")
    ev.add_argument("--slurm", action="store_true", help="submit a job array + aggregation job")
    ev.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs")
    ev.add_argument("--wait-timeout", type=float, default=None, help="seconds (default: none)")
    ev.add_argument("--force", action="store_true",
                    help="output_dir holds results of other weights or benchmark files: "
                         "discard them and evaluate again")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. k=4 limit=10")
    shard = sub.add_parser("eval-shard", help="run one shard of a planned evaluation")
    shard.add_argument("out_dir")
    shard.add_argument("index", type=int)
    agg = sub.add_parser("eval-aggregate", help="merge the shards into the summary")
    agg.add_argument("out_dir")
    res = sub.add_parser("eval-resubmit", help="resubmit the shards without results (Slurm)")
    res.add_argument("out_dir")
    res.add_argument("--wait", action="store_true")
    res.add_argument("--wait-timeout", type=float, default=None)
    conv = sub.add_parser("eval-convert", help="convert the evaluation's Megatron checkpoint")
    conv.add_argument("out_dir")


def _follow(plan, jobs, timeout) -> int:
    # lazy: `megatron-trapo --help` and the other subcommands build this parser without eval's
    # stack
    from megatron_trapo.eval import slurm
    from megatron_trapo.eval.summary import collect

    slurm.wait(list(jobs.values()), plan.cfg.slurm.poll_interval_s, timeout)
    summary = plan.out_dir / "summary.md"
    if summary.is_file():
        print(summary.read_text(), end="")
        return 0
    collect(plan)  # raises IncompleteResults naming the missing shards
    print(f"megatron-trapo: error: the aggregation job {jobs['aggregate']} did not write "
          f"{summary}; see {plan.out_dir / 'slurm' / 'logs'}", file=sys.stderr)
    return 1


def run(args) -> int:
    # lazy: `megatron-trapo --help` and the other subcommands build this parser without eval's
    # stack
    from megatron_trapo.eval import runner, slurm
    from megatron_trapo.eval.summary import aggregate
    from megatron_trapo.rollout.types import RolloutError

    try:
        if args.command == "eval":
            cfg = load_config(EvalConfig, args.config, args.overrides)
            if not args.slurm:
                runner.run_local(cfg, force=args.force)
                print((runner.load_plan(cfg.output_dir).out_dir / "summary.md").read_text(), end="")
                return 0
            plan = runner.prepare(cfg, force=args.force)
            runner.hf_model_dir(plan)  # a missing model is an error now, not in every task
            jobs = slurm.submit(plan)
            print(json.dumps({"out_dir": str(plan.out_dir), **jobs}))
            return _follow(plan, jobs, args.wait_timeout) if args.wait else 0
        if args.command == "eval-shard":
            print(runner.run_one_shard(args.out_dir, args.index))
        elif args.command == "eval-aggregate":
            aggregate(args.out_dir)
            print((runner.load_plan(args.out_dir).out_dir / "summary.md").read_text(), end="")
        elif args.command == "eval-resubmit":
            jobs = slurm.resubmit(args.out_dir)
            print(json.dumps(jobs))
            if args.wait:
                return _follow(runner.load_plan(args.out_dir), jobs, args.wait_timeout)
        elif args.command == "eval-convert":
            print(runner.convert_only(args.out_dir))
        return 0
    except ConfigError as exc:
        print_error(exc)
        return 2
    except (slurm.SlurmError, RolloutError) as exc:
        print_error(exc)
        return 1
