"""The README's main job: set up the CPU demo and compare TRAPO with its baselines.

    python -m megatron_trapo.cpu_demo.compare --out runs/cpu_demo [--quick] [--seeds 1]

1. generate the synthetic arithmetic task (pretraining split of 1–2-step problems; training
   and held-out splits of 1–4 steps) and train a tokenizer on it;
2. "pretrain" a tiny GPT on the easy split with SFT (Megatron-Core, 2 gloo processes) — the base;
3. from the base, train each method (SFT, GRPO, TRAPO, and the plain-SFT-interleaving
   ablation) with rollouts on the HF engine and in-process weight sync;
4. evaluate every run on the held-out split, print the accuracy table, write results.json,
   results.md and the training-curve plot.
Each stage is a ``megatron-trapo train`` run under torchrun; a finished stage is skipped on a
re-run (delete the output folder to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from matplotlib.figure import Figure

from megatron_trapo.data.records import save_records
from megatron_trapo.data.synthetic import make_split, tokenizer_corpus
from megatron_trapo.data.tokenizer import train_bpe_tokenizer

METHODS = ["sft", "grpo", "trapo", "trapo_plain_sft"]

MODEL = {"model_preset": "tiny", "model.num_layers": 4, "model.hidden_size": 128,
         "model.ffn_hidden_size": 512, "model.num_attention_heads": 4,
         "model.num_query_groups": 2, "model.vocab_size": 384,
         "model.max_position_embeddings": 256}


def _sizes(quick: bool) -> dict:
    if quick:
        return {"pretrain": 2000, "train": 400, "eval": 64, "pre_iters": 120, "iters": 6,
                "prompts": 8, "pre_prompts": 64}
    return {"pretrain": 4000, "train": 1000, "eval": 200, "pre_iters": 300, "iters": 40,
            "prompts": 16, "pre_prompts": 64}


def prepare(out: Path, sizes: dict) -> None:
    data = out / "data"
    if (data / "eval.jsonl").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    pre = make_split(sizes["pretrain"], 0, [1, 2], "pretrain")
    train = make_split(sizes["train"], 0, [1, 2, 3, 4], "train")
    evals = make_split(sizes["eval"], 0, [1, 2, 3, 4], "eval")
    train_bpe_tokenizer(tokenizer_corpus(pre + train), 400, data / "tokenizer",
                        individual_digits=True)
    save_records(pre, data / "pretrain.jsonl")
    save_records(train, data / "train.jsonl")
    save_records(evals, data / "eval.jsonl")


def train(out: Path, name: str, overrides: Dict[str, object], nproc: int = 2) -> Path:
    """One ``megatron-trapo train`` run (skipped when its final metrics exist)."""
    run = out / "runs" / name
    done = run / "final.json"
    if done.is_file():
        return run
    args = [f"{k}={v}" for k, v in {**MODEL, **overrides, "log_dir": run / "logs",
                                     "checkpoint.save": run / "ckpt"}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_trapo.cli", "train",
           "--resume", *args]  # a stage cut off earlier continues from its last checkpoint
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
    log = open(out / "runs" / f"{name}.log", "w")
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see "
                         f"{out / 'runs' / (name + '.log')}")
    records = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    done.write_text(json.dumps({"first_eval": evals[0], "last_eval": evals[-1]}))
    return run


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the CPU demo: TRAPO vs baselines")
    ap.add_argument("--out", default="runs/cpu_demo")
    ap.add_argument("--quick", action="store_true", help="a small version for CI (~3 min)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    sizes = _sizes(args.quick)
    t0 = time.time()
    prepare(out, sizes)
    data = out / "data"
    common = {"rollout.tokenizer_path": data / "tokenizer", "eval.data": data / "eval.jsonl",
              "loss.max_response_length": 64, "batching.max_tokens_per_microbatch": 8192}
    base = train(out, "base", {**common, "train_data": data / "pretrain.jsonl",
                               "loss.loss_mode": "sft", "loss.aggregation": "token_mean",
                               "prompts_per_step": sizes["pre_prompts"],
                               "train_iters": sizes["pre_iters"], "optimizer.lr": 2e-3,
                               "eval.interval": 0, "seed": 1})
    base_ckpt = base / "ckpt"
    results: Dict[str, List[float]] = {"base": [json.loads((base / "final.json").read_text())
                                                ["last_eval"]["eval/accuracy"]]}
    for method in [m for m in args.methods.split(",") if m]:
        for seed in range(1, args.seeds + 1):
            run = train(out, f"{method}_seed{seed}", {
                **common, "load": base_ckpt, "train_data": data / "train.jsonl",
                "loss.loss_mode": method, "prompts_per_step": sizes["prompts"],
                "train_iters": sizes["iters"], "optimizer.lr": 1e-4 if method != "sft" else 5e-4,
                "loss.aggregation": "token_mean", "seed": seed,
                "eval.interval": max(sizes["iters"] // 4, 1)})
            final = json.loads((run / "final.json").read_text())
            results.setdefault(method, []).append(final["last_eval"]["eval/accuracy"])
    table = ["| method | held-out accuracy (mean ± std over seeds) | runs |", "|---|---|---|"]
    for method, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        table.append(f"| {method} | {100 * statistics.mean(accs):.1f} ± {100 * spread:.1f} | "
                     f"{len(accs)} |")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    plot_runs(out, results)
    print("\n".join(table))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.png'} "
          f"in {time.time() - t0:.0f} s")
    return 0


def plot_runs(out: Path, results: Dict[str, List[float]]) -> None:
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    for method in [m for m in results if m != "base"]:
        metrics = out / "runs" / f"{method}_seed1" / "logs" / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows = [json.loads(l) for l in metrics.read_text().splitlines()]
        ev = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        rw = [(r["step"], r["rollout/reward_unguided"]) for r in rows
              if "rollout/reward_unguided" in r]
        axes[0].plot(*zip(*ev), marker="o", label=method)
        if rw:
            axes[1].plot(*zip(*rw), label=method)
    axes[0].set_title("held-out accuracy (seed 1)")
    axes[1].set_title("training reward, free rollouts")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
