"""The README's main job: Table 1 of the paper at CPU scale — TRAPO against its baselines.

    python -m megatron_trapo.cpu_demo.compare --out runs/cpu_demo [--quick] [--seeds N]
        [--ablation] [--tune]

1. make the synthetic task (``cpu_demo/task.py``) and a tokenizer, locally;
2. "pretrain" the base (a tiny GPT, Megatron-Core on 2 gloo processes) with SFT on a mixture
   of short chains — competent on one step, partly right in the middle, never shown the
   longest (cached in the output folder: a re-run reuses it);
3. train each method from the base for the same number of optimizer steps: SFT, GRPO,
   SFT-then-RL (GRPO from the SFT run), LUFFY and TRAPO; ``--ablation`` adds the paper's
   ladder (GRPO → + micro-groups with prefixes as context → + plain SFT on them → + LUFFY's
   shaping on them → + TrSFT = TRAPO);
4. evaluate every run on the held-out split during training, then write ``results.md`` (the
   table overall and per difficulty, mean ± std over seeds, TRAPO paired against every other
   method), ``results.json``, ``accuracy.png`` and ``training.png``.

Learning rates are fixed per method in :data:`LR`; ``--tune`` chooses them again from a small
grid by accuracy on problems of the training distribution that no run trains on
(``data/tune_probe.jsonl``), never on held-out ones.
Every stage is a ``megatron-trapo train`` run; a finished one is skipped on a re-run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

from megatron_trapo.cpu_demo import report
from megatron_trapo.cpu_demo.stage import final, run_stage
from megatron_trapo.cpu_demo.task import FULL, QUICK, Sizes, prepare

TABLE1 = ("sft", "grpo", "sft_then_rl", "luffy", "trapo")
QUICK_METHODS = ("grpo", "trapo")  # --quick: the RL baseline and TRAPO, for CI's time
ABLATION = ("grpo", "trapo_prefix_context", "trapo_plain_sft", "trapo_luffy_prefix", "trapo")
# The learning rate of each method (SFT-then-RL: of its RL stage; its SFT stage is the SFT
# run): the best final accuracy of LR_GRID after the same steps on the tuning probe,
# training-distribution problems no run trains on (ties: the smaller lr), by `--tune` (README,
# "The CPU demo"). The ablation rows take TRAPO's.
LR: Dict[str, float] = {"sft": 1e-4, "grpo": 3e-5, "sft_then_rl": 3e-5, "luffy": 3e-5,
                        "trapo": 3e-5, "trapo_prefix_context": 3e-5, "trapo_plain_sft": 3e-5,
                        "trapo_luffy_prefix": 3e-5}
LR_GRID = (1e-5, 2e-5, 3e-5, 1e-4)
PROMPT = "{problem}\n"


def common(data: Path, sizes: Sizes) -> Dict[str, object]:
    # the prompt is the problem alone: a model pretrained from scratch has no use for the
    # paper's instruction, and on this model a prompt token costs about what a response one does
    return {"rollout.tokenizer_path": data / "tokenizer", "data.prompt_template": PROMPT,
            "loss.max_response_length": sizes.max_response_length,
            "eval.temperature": sizes.eval_temperature, "eval.k": sizes.eval_k,
            "batching.max_tokens_per_microbatch": 8192, "loss.aggregation": "token_mean",
            # glibc's own allocation: the per-tensor mmap that bounds a large model's memory
            # costs this tiny one a quarter of its step (page faults), for nothing
            "batching.cpu_mmap_threshold_kb": None,
            # a held-out evaluation in 3 engine calls a rank, not 9 (greedy: the same answers;
            # -0.5 s of the base's 2.8 s evaluation)
            "rollout.max_batch_size": 256,
            # accuracy: the mean of the five levels' (Sizes.eval_extra samples the middle
            # ones more); the reward, weight decay and entropy bonus are the trainer's
            # defaults, the reference's (fidelity review D6, D7, D10)
            "eval.average": "sources"}


def pretrain(out: Path, sizes: Sizes, eval_file: str = "eval.jsonl",
             extra: Dict[str, object] | None = None) -> Path:
    """The base (``eval_file``, ``extra``: benchmarks/size_base.py scores it on training
    problems instead, sampled as GRPO samples them)."""
    data = out / "data"
    return run_stage(out, "base", {
        **common(data, sizes), "train_data": data / "pretrain.jsonl",
        "eval.data": data / eval_file, "loss.loss_mode": "sft",
        "prompts_per_step": sizes.pre_prompts, "train_iters": sizes.pre_iters,
        "optimizer.lr": sizes.pre_lr, "optimizer.lr_decay_style": "cosine",
        "optimizer.lr_warmup_iters": max(sizes.pre_iters // 30, 1), "eval.interval": 0,
        # the base's own recipe, as the README's base was measured, not the methods': no
        # weight decay and no entropy bonus (on "generated" tokens, of which SFT has none);
        # the trainer's defaults moving (fidelity review D7, D10) must not change the base
        "optimizer.weight_decay": 0.0, "loss.entropy_tokens": "generated",
        # a rank's 8 sequences in micro-batches of <= 256 tokens, not one padded to the longest
        # (the same gradient, 13% less time: 0.14 s a step, not 0.16); no evaluation of the
        # random weights it starts from
        "batching.cpu_max_tokens_per_microbatch": 256, "eval.at_start": False,
        "seed": 1, **(extra or {})})


def train_method(out: Path, sizes: Sizes, method: str, seed: int, lr: float,
                 eval_file: str = "eval.jsonl", tag: str = "",
                 extra: Dict[str, object] | None = None) -> Path:
    """One method's run from the base (SFT-then-RL: GRPO from the SFT run of the same seed
    and tag, run first when missing); ``extra``: more overrides (benchmarks' variants)."""
    data = out / "data"
    start = out / "runs" / "base" / "ckpt"
    mode = method
    if method == "sft_then_rl":
        sft_tag = f"_lr{LR['sft']:g}" if tag else ""  # tuning: the SFT run at its chosen lr
        start = train_method(out, sizes, "sft", seed, LR["sft"], eval_file, sft_tag) / "ckpt"
        mode = "grpo"
    return run_stage(out, f"{method}{tag}_seed{seed}", {
        **common(data, sizes), "load": start, "train_data": data / "train.jsonl",
        "eval.data": data / eval_file, "loss.loss_mode": mode,
        "prompts_per_step": sizes.prompts, "train_iters": sizes.iters, "optimizer.lr": lr,
        "seed": seed, "eval.interval": max(sizes.iters // sizes.evals, 1), **(extra or {})})


def score(out: Path, name: str, ckpt: Path, data: Path, sizes: Sizes, eval_data: Path,
          extra: Dict[str, object] | None = None) -> dict:
    """The evaluation of checkpoint ``ckpt`` on ``eval_data`` (its metrics row), as the
    trainer's own evaluator scores the demo's runs: the step-0 evaluation of a one-step run
    at lr 0 from it, into ``out/runs/name``; ``extra``: e.g. another ``eval.temperature``."""
    run = run_stage(out, name, {
        **common(data, sizes), "load": ckpt, "train_data": data / "train.jsonl",
        "eval.data": eval_data, "loss.loss_mode": "sft", "prompts_per_step": 2,
        "train_iters": 1, "optimizer.lr": 0.0, "eval.interval": 1, "seed": 1, **(extra or {})})
    return final(run)["first_eval"]


def tune(out: Path, sizes: Sizes, methods: List[str]) -> Dict[str, dict]:
    """Each method at each learning rate of :data:`LR_GRID` (seed 1), scored by its final
    accuracy on the tuning probe (training-distribution problems no run trains on); the best
    becomes the method's learning rate."""
    chosen = {}
    for method in methods:  # sft first: SFT-then-RL starts from the tuned SFT run
        scores = {}
        for lr in LR_GRID:
            run = train_method(out, sizes, method, 1, lr, "tune_probe.jsonl", f"_lr{lr:g}")
            scores[lr] = final(run)["last_eval"]["eval/accuracy"]
        LR[method] = max(scores, key=lambda lr: (scores[lr], -lr))
        start = final(run)["first_eval"]["eval/accuracy"]  # its starting point on the probe
        chosen[method] = {"lr": LR[method], "tune_probe_accuracy": scores,
                          "tune_probe_accuracy_at_start": start}
        print(f"  {method}: lr {LR[method]:g} (tuning-probe accuracy {start:.3f} at the "
              "start; after training at lr " + ", ".join(f"{k:g}: {v:.3f}" for k, v in
                                                          scores.items()) + ")", flush=True)
    (out / "tuning.json").write_text(json.dumps(chosen, indent=2))
    return chosen


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the CPU demo: Table 1 of TRAPO at CPU scale")
    ap.add_argument("--out", default="runs/cpu_demo")
    ap.add_argument("--quick", action="store_true",
                    help="a small version for CI (< 3 min): a smaller base, GRPO and TRAPO")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ablation", action="store_true", help="add the paper's ablation rows")
    ap.add_argument("--tune", action="store_true",
                    help="choose each method's lr from a grid on training-problem accuracy")
    ap.add_argument("--methods", default=None, help="comma-separated (default: Table 1)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    methods = (args.methods.split(",") if args.methods
               else list(QUICK_METHODS if args.quick else TABLE1))
    if args.ablation:
        methods += [m for m in ABLATION if m not in methods]
    unknown = [m for m in methods if m not in LR]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; known: {sorted(LR)}")
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    t0 = time.time()
    prepare(out / "data", sizes)
    pretrain(out, sizes)
    tuning = None
    if args.tune:  # Table 1's methods (sft first: SFT-then-RL starts from the tuned SFT run)
        tuning = tune(out, sizes, sorted({m for m in methods if m in TABLE1} |
                                         ({"sft"} if "sft_then_rl" in methods else set()),
                                         key=lambda m: (m != "sft", m)))
    for m in ABLATION:  # the ablation rows differ from TRAPO in one component: TRAPO's lr
        if m not in TABLE1:
            LR[m] = LR["trapo"]
    runs = {m: [train_method(out, sizes, m, s, LR[m]) for s in range(1, args.seeds + 1)]
            for m in methods}
    report.write(out, runs, sizes, {m: LR[m] for m in methods}, tuning, argv or sys.argv[1:],
                 time.time() - t0, LR_GRID)
    return 0


if __name__ == "__main__":
    sys.exit(main())
