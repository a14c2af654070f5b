"""Score the CPU demo's finished runs again under another decoding: e.g. as the paper scores
(pass@1 at temperature 0.6, averaged over k samples per problem: avg@k) where the demo's
table is greedy. It starts from their final checkpoints and uses the same held-out split,
grader and per-level averaging.

    .venv/bin/python benchmarks/rescore_demo.py --demo runs/cpu_demo --temperature 0.6 --k 4
        [--methods grpo,trapo] [--seeds 3]

Each checkpoint is scored by the step-0 evaluation of a one-step run at lr 0 from it: the
trainer's own evaluator, as the table's numbers are. Sample j of problem i gets the same seed
for every checkpoint, so the base and the methods are compared on the same random numbers.
Prints, per method, the mean ± std over seeds overall and per level, and the gain over the
base in seed stds (the issue's bar: above 3); writes ``rescore_T{t}_k{k}.json`` in ``--demo``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_trapo.cpu_demo.compare import TABLE1, score
from megatron_trapo.cpu_demo.stats import gain_over, mean_std
from megatron_trapo.cpu_demo.task import FULL


def checkpoints(demo: Path, methods: Sequence[str], seeds: int) -> Dict[str, List[Path]]:
    """The final checkpoint of the base and of each method's seeds 1..``seeds``; a run that
    did not finish is named, not skipped (a mean over fewer seeds would not say so)."""
    found: Dict[str, List[Path]] = {}
    for method in ["base", *methods]:
        names = ["base"] if method == "base" else [f"{method}_seed{s}"
                                                   for s in range(1, seeds + 1)]
        for name in names:
            if not (demo / "runs" / name / "final.json").is_file():
                raise SystemExit(f"--methods {method}: no finished run {demo / 'runs' / name} "
                                 "(no final.json); run the demo with these seeds first")
        found[method] = [demo / "runs" / name / "ckpt" for name in names]
    return found


def summarize(scores: Dict[str, List[Dict[str, float]]]) -> Dict[str, dict]:
    """Per method: mean and std over its seeds' ``eval/accuracy…`` values, and the overall
    gain over the base (its one value) with that gain in seed stds."""
    base = scores["base"][0]["eval/accuracy"]
    out = {}
    for method, runs in scores.items():
        keys = sorted(k for k in runs[0] if k.startswith("eval/accuracy"))
        row = {k: mean_std([r[k] for r in runs]) for k in keys}
        gain, std, in_stds = gain_over(base, [r["eval/accuracy"] for r in runs])
        out[method] = {"mean_std": row, "gain": gain, "seed_std": std, "gain_in_stds": in_stds,
                       "seeds": len(runs)}
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="runs/cpu_demo", help="the demo's --out folder")
    ap.add_argument("--methods", default="grpo", help=f"comma-separated, of {', '.join(TABLE1)}"
                    " and the ablation rows")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--k", type=int, default=4, help="samples per problem (avg@k)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.k < 1 or args.temperature < 0:
        ap.error("--seeds and --k must be >= 1, --temperature >= 0")
    demo = Path(args.demo).resolve()
    data = demo / "data"
    if not (data / "eval.jsonl").is_file():
        ap.error(f"--demo {demo}: no data/eval.jsonl (not a demo folder)")
    ckpts = checkpoints(demo, [m for m in args.methods.split(",") if m], args.seeds)
    tag = f"T{args.temperature:g}_k{args.k}"
    scores: Dict[str, List[Dict[str, float]]] = {}
    for method, paths in ckpts.items():
        for path in paths:
            first = score(demo / "rescore", f"{path.parent.name}_{tag}", path, data, FULL,
                          data / "eval.jsonl", {"eval.temperature": args.temperature,
                                                "eval.k": args.k})
            scores.setdefault(method, []).append(
                {k: v for k, v in first.items() if k.startswith("eval/accuracy")})
    table = summarize(scores)
    levels = sorted(k for k in scores["base"][0] if k != "eval/accuracy")
    print(f"held-out accuracy (%), avg@{args.k} at T = {args.temperature:g}, mean ± std over "
          "seeds; overall, then levels " + ", ".join(k.rsplit("/", 1)[1] for k in levels))
    for method, row in table.items():
        cells = [row["mean_std"][k] for k in ["eval/accuracy", *levels]]
        gain = ("" if method == "base" else
                f"  gain {100 * row['gain']:+.1f} = {row['gain_in_stds']:+.1f} seed stds")
        print(f"{method:<22} " + "  ".join(f"{100 * m:5.1f} ± {100 * s:3.1f}" for m, s in cells)
              + gain)
    (demo / f"rescore_{tag}.json").write_text(json.dumps(
        {"temperature": args.temperature, "k": args.k, "scores": scores, "table": table},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
