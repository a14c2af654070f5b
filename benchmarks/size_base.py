"""Size the CPU demo's base (issue 17) on training problems, never held-out ones: how much of
each level the base solves when sampled as GRPO samples it, and on how many problems a group
of ``k`` samples disagrees (0 < correct < k: the only problems whose group-relative advantage
is not zero, i.e. where RL gets a signal).

    .venv/bin/python benchmarks/size_base.py --out runs/size_base [--pre-iters 1800]
        [--pretrain 9000] [--direct 2:0.4,3:0.4] [--mix 1:5,2:3,3:2,4:0.5] [--problems 500] [--k 8]
        [--temperature 1.0]

Each variant is a base pretrained as the demo pretrains it (``cpu_demo.compare.pretrain``,
:data:`~megatron_trapo.cpu_demo.task.FULL` with the flags changed) in its own folder under
``--out`` (cached like the demo's stages), scored on the first ``--problems`` problems of the
methods' training split: greedy (as the demo scores held-out problems; a one-step run at lr 0
from the base) and ``k`` samples each at ``--temperature``. Prints, per level, the greedy
accuracy, the mean pass rate, the share of problems with a mixed group and the share none of
whose samples is right; writes ``size_base.json`` beside the variant's runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

from megatron_trapo.cpu_demo.compare import pretrain, score
from megatron_trapo.cpu_demo.stage import final
from megatron_trapo.cpu_demo.stats import final_rows, read_final_eval
from megatron_trapo.cpu_demo.task import FULL, prepare
from megatron_trapo.data.records import load_records, save_records


def parse_levels(text: str, flag: str = "--mix") -> Dict[int, float]:
    """``1:5,2:3`` -> {1: 5.0, 2: 3.0} (levels and their weights or shares); ``""`` -> {}."""
    if not text:
        return {}
    try:
        mix = {int(a): float(b) for a, b in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"{flag}: expected level:value,... (e.g. 1:5,2:3), got {text!r}")
    if min(mix.values()) < 0:
        raise SystemExit(f"{flag}: values must be >= 0, got {text!r}")
    return mix


def parse_mix(text: str) -> Dict[int, float]:
    """``1:5,2:3`` -> {1: 5.0, 2: 3.0} (levels and weights of the pretraining mixture)."""
    mix = parse_levels(text)
    if not any(mix.values()):
        raise SystemExit(f"--mix: weights must be >= 0 and not all 0, got {text!r}")
    return mix


def per_level(rows: List[dict], k: int) -> Dict[str, Dict[str, float]]:
    """Per source, over the last evaluation's ``rows`` (``stats.final_rows``): mean pass
    rate, share of problems with 0 < correct < k, share with 0."""
    counts = Counter(r["id"] for r in rows)
    bad = sorted({n for n in counts.values() if n != k})
    if bad:
        raise SystemExit(f"groups of {bad[:3]} samples, expected --k {k}")
    shares = read_final_eval(rows)  # problem id -> share of its k samples correct
    source_of = {r["id"]: r["source"] for r in rows}
    out: Dict[str, Dict[str, float]] = {}
    for source in sorted(set(source_of.values())):
        level = [c for pid, c in shares.items() if source_of[pid] == source]
        out[source] = {"pass_rate": sum(level) / len(level),
                       "mixed": sum(0 < c < 1 for c in level) / len(level),
                       "none": sum(c == 0 for c in level) / len(level),
                       "problems": len(level)}
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/size_base")
    ap.add_argument("--pre-iters", type=int, default=FULL.pre_iters)
    ap.add_argument("--pretrain", type=int, default=FULL.pretrain, help="pretraining problems")
    ap.add_argument("--mix", default=",".join(f"{a}:{b:g}" for a, b in FULL.pretrain_mix.items()))
    ap.add_argument("--direct", default=",".join(f"{a}:{b:g}" for a, b in
                                                  FULL.pretrain_direct.items()),
                    help="per level, the share of pretraining problems answered without "
                         "working (level:share,...; '' for none)")
    ap.add_argument("--problems", type=int, default=500, help="training problems scored")
    ap.add_argument("--k", type=int, default=8, help="samples per problem (GRPO's group)")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.pre_iters < 1 or args.problems < 1 or args.k < 1:
        ap.error("--pre-iters, --problems and --k must be >= 1")
    direct = parse_levels(args.direct, "--direct")
    if any(v > 1 for v in direct.values()):
        ap.error(f"--direct: shares in [0, 1], got {args.direct!r}")
    sizes = dataclasses.replace(FULL, pre_iters=args.pre_iters, pretrain=args.pretrain,
                                pretrain_mix=parse_mix(args.mix),
                                pretrain_direct=direct)
    name = (f"iters{sizes.pre_iters}_n{sizes.pretrain}_mix"
            + "-".join(f"{a}x{b:g}" for a, b in sizes.pretrain_mix.items())
            + ("_direct" + "-".join(f"{a}x{b:g}" for a, b in direct.items()) if direct else ""))
    out = Path(args.out).resolve() / name
    prepare(out / "data", sizes)
    probe = out / "data" / f"train_first{args.problems}.jsonl"
    save_records(load_records(out / "data" / "train.jsonl")[:args.problems], probe)
    t0 = time.time()
    run = pretrain(out, sizes, probe.name, {"eval.temperature": args.temperature,
                                            "eval.k": args.k})
    wall = final(run)["wall_s"]
    # greedy, as the demo scores held-out problems
    first = score(out, "base_greedy", run / "ckpt", out / "data", sizes, probe)
    # the last evaluation's samples (the trainer also evaluates at step 0)
    table = per_level(final_rows(run / "logs" / "eval_samples.jsonl"), args.k)
    for source, row in table.items():
        row["greedy"] = first[f"eval/accuracy/{source}"]
    print(f"{name}: base {wall:.0f} s ({time.time() - t0:.0f} s this call); {args.problems} "
          f"training problems x {args.k} samples at T={args.temperature:g}")
    print(f"{'level':<18} {'greedy':>6} {'pass rate':>9} {'mixed':>6} {'none':>6} {'n':>4}")
    for source, row in table.items():
        print(f"{source:<18} {row['greedy']:6.3f} {row['pass_rate']:9.3f} {row['mixed']:6.2f} "
              f"{row['none']:6.2f} {row['problems']:4d}")
    (out / "size_base.json").write_text(json.dumps(
        {"sizes": dataclasses.asdict(sizes), "k": args.k, "temperature": args.temperature,
         "problems": args.problems, "base_wall_s": wall, "levels": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
