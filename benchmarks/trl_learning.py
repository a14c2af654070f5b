"""An independent check of our RL (``bench_vs_trl.py --learning``): our GRPO and TRL's
``GRPOTrainer`` from the same base weights, on the same data, prompt, reward and
hyper-parameters, for the same steps and seeds; both sides' held-out accuracy curves.

    .venv/bin/python benchmarks/bench_vs_trl.py --learning --base runs/cpu_demo/runs/base/ckpt \
        [--seeds 3] [--out runs/bench_learning] [--same-prompt-order]

The base is the CPU demo's (its folder's ``data/`` holds the splits and tokenizer); TRL loads
it as an HF safetensors folder made by ``tools/convert_mcore_to_hf.py``. Ours is the demo's own
GRPO run (``cpu_demo.compare.train_method``: 2 gloo processes, the demo's lr and sizes). TRL:
one process; 16 prompts × 8 generations per step, the same ≤ 96 new tokens, temperature 1,
constant lr, Adam (0.9, 0.999, 1e-8), grad clip 1.0, no KL, no std scaling, token-mean loss
(``dapo``), entropy bonus 0.001, one optimizer step per generation batch, and float32 like ours
(``bf16=False``: GRPOConfig's own default is bf16=True, which on a CPU runs TRL's forward and
backward under bf16 autocast — its gradient then differs from the exact one by cos 0.9992 where
ours and TRL's in fp32 agree with a float64 reference to cos 1.000000;
``bench_vs_trl.py --gradient``). Held-out accuracy on
both sides: greedy decoding of the demo's ``eval.jsonl``, graded by ``reward.grading``, the
mean of its levels' accuracies (the demo's ``eval.average=sources``).
Each side shuffles the training prompts with its own generator, unless
``--same-prompt-order``: then TRL takes them unshuffled in our order for the seed
(``data.items.PromptData``), and step k of both sides trains on the same 16 prompts.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve())


def export_base(out: Path, base: Optional[str]) -> tuple:
    """(the demo's folder, the base as an HF folder in ``out/hf_base``, the base's
    fingerprint); ``out`` gets links to the demo's ``data/`` and base run, so that our runs
    made there start from the same base. The HF folder records the fingerprint of the
    checkpoint it was made from and is made again when the base changed (it was kept
    before: TRL went on training the previous base). The fingerprint is the one the demo's
    stage cache keys our runs on (``stage.inputs``: the SHA-256 of the ``final.json`` of the
    stage that wrote the checkpoint), so both sides agree on which base they start from."""
    from megatron_trapo.cpu_demo.stage import inputs  # lazy: as main's imports

    if not base:
        raise SystemExit("--learning/--gradient need --base: the CPU demo's base checkpoint "
                         "(runs/cpu_demo/runs/base/ckpt after bash examples/run_trapo_cpu.sh)")
    base_ckpt = Path(base).resolve()
    demo = base_ckpt.parents[2]  # <demo out>/runs/base/ckpt
    if not (demo / "data" / "eval.jsonl").is_file():
        raise SystemExit(f"--base {base}: no {demo / 'data' / 'eval.jsonl'} beside it (the "
                         "demo's splits and tokenizer)")
    out = out.resolve()
    _link(demo / "data", out / "data")
    _link(demo / "runs" / "base", out / "runs" / "base")
    fp = inputs({"load": base_ckpt}).get("load")
    if fp is None:
        raise SystemExit(f"--base {base}: no {base_ckpt.parent / 'final.json'} beside it (the "
                         "base run did not finish)")
    hf = out / "hf_base"
    made_from = hf / "base_fingerprint.txt"
    if not (hf / "config.json").is_file() or not made_from.is_file() or \
            made_from.read_text().strip() != fp:
        shutil.rmtree(hf, ignore_errors=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "convert_mcore_to_hf.py"),
                        "--mcore-dir", str(base_ckpt), "--out-dir", str(hf)], check=True,
                       capture_output=True)
        made_from.write_text(fp + "\n")
    return demo, hf, fp


def main(out: Path, base: Optional[str], seeds: int, lr: Optional[float] = None,
         same_order: bool = False) -> int:
    from megatron_trapo.cpu_demo.compare import LR, train_method  # lazy: the bench's CLI
    from megatron_trapo.cpu_demo.stage import metrics
    from megatron_trapo.cpu_demo.task import FULL

    _, hf, base_fp = export_base(out, base)
    out = out.resolve()
    sizes, lr = FULL, lr or LR["grpo"]
    # TRL's results and the report; "fp32": results of the earlier bf16-autocast worker are
    # not picked up
    name = f"fp32_lr{lr:g}" + ("_ordered" if same_order else "")
    every = max(sizes.iters // sizes.evals, 1)
    curves: Dict[str, List[Dict[int, float]]] = {"ours": [], "trl": []}
    for seed in range(1, seeds + 1):
        # the demo's own GRPO run when the lr is the demo's (with --out the demo's folder, the
        # runs it made are reused), else a run of its own
        run = train_method(out, sizes, "grpo", seed, lr,
                           tag="" if lr == LR["grpo"] else f"_lr{lr:g}")
        curves["ours"].append({r["step"]: r["eval/accuracy"] for r in metrics(run)
                               if "eval/accuracy" in r})
        # TRL's result names the base it started from: one of another base is not reused
        result = out / f"trl_{name}_base{base_fp[:12]}_seed{seed}.json"
        if not result.is_file():
            print(f"[{time.strftime('%H:%M:%S')}] TRL GRPO seed {seed}", flush=True)
            work = {"model": str(hf), "data": str(out / "data"), "seed": seed, "lr": lr,
                    "steps": sizes.iters, "prompts": sizes.prompts, "group": 8,
                    "new_tokens": sizes.max_response_length, "every": every,
                    "same_order": same_order}
            with open(result.with_suffix(".log"), "w") as log:
                subprocess.run([sys.executable, str(Path(__file__).parent / "bench_vs_trl.py"),
                                "--learning-worker", "--workload", json.dumps(work),
                                "--result", str(result)], check=True, stdout=log,
                               stderr=subprocess.STDOUT)
        curves["trl"].append({int(k): v for k, v in json.loads(result.read_text()).items()})
    lines = report(curves, lr, sizes)
    out = out / name
    out.mkdir(exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, curves)
    print("\n".join(lines))
    print(f"\nwrote {out / 'results.md'} and {out / 'learning.png'}")
    return 0


def _stats(curve_set: List[Dict[int, float]], step: int) -> str:
    vals = [c[step] for c in curve_set if step in c]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}"


def report(curves: Dict[str, List[Dict[int, float]]], lr: float, sizes) -> List[str]:
    steps = sorted(set().union(*(c.keys() for side in curves.values() for c in side)))
    seeds = len(curves["ours"])
    lines = [f"# Our GRPO vs TRL GRPOTrainer from the CPU demo's base ({seeds} seeds, "
             f"lr {lr:g}, {sizes.prompts} prompts × 8, ≤ {sizes.max_response_length} tokens)",
             "", "held-out accuracy (greedy), mean ± std over seeds:", "",
             "| step | ours | TRL |", "|---|---|---|"]
    lines += [f"| {s} | {_stats(curves['ours'], s)} | {_stats(curves['trl'], s)} |"
              for s in steps]
    last = steps[-1]
    ours = [c[last] for c in curves["ours"]]
    trl = [c[last] for c in curves["trl"]]
    spread = max(statistics.stdev(ours) if len(ours) > 1 else 0.0,
                 statistics.stdev(trl) if len(trl) > 1 else 0.0)
    gap = statistics.mean(ours) - statistics.mean(trl)
    lines += ["", f"final difference ours − TRL {100 * gap:+.1f} points; the larger seed std "
              f"{100 * spread:.1f}: " + ("within the seed spread" if abs(gap) <= 2 * spread
                                       else "outside twice the seed spread")]
    if len(ours) == len(trl) > 1:  # seed k on both sides: the same base and, ordered, prompts
        diffs = [100 * (o - t) for o, t in zip(ours, trl)]
        sd = statistics.stdev(diffs)
        t_stat = statistics.mean(diffs) / (sd / len(diffs) ** 0.5) if sd > 0 else float("inf")
        lines += [f"paired by seed, ours − TRL: {', '.join(f'{d:+.2f}' for d in diffs)} "
                  f"(mean {statistics.mean(diffs):+.2f}, paired t {t_stat:+.2f}, "
                  f"{len(diffs) - 1} dof)"]
    return lines


def plot(out: Path, curves: Dict[str, List[Dict[int, float]]]) -> None:
    from matplotlib.figure import Figure  # lazy: as the report

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for side, style in (("ours", "-"), ("trl", "--")):
        for k, c in enumerate(curves[side]):
            xs = sorted(c)
            ax.plot(xs, [c[x] for x in xs], style, color="C0" if side == "ours" else "C1",
                    alpha=0.8, label=f"{'ours' if side == 'ours' else 'TRL'}" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=100)


def worker(work: dict, result: Path) -> int:
    """TRL's GRPOTrainer from the HF base; held-out accuracy at step 0 and every
    ``every`` steps, in one JSON object {step: accuracy}."""
    # lazy: TRL is the optional [bench] extra, imported only in its own worker process
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_trapo.cpu_demo.compare import PROMPT
    from megatron_trapo.data.records import load_records
    from megatron_trapo.data.tokenizer import stop_token_ids
    from megatron_trapo.reward.grading import grade_response
    from megatron_trapo.reward.math_reward import verify_answer
    from megatron_trapo.config import OptimizerConfig, RewardConfig
    # the demo's settings are the trainer's defaults (fidelity review D6, D7): TRL's weight
    # decay skips norms and biases where ours does not, 4e-6 of a weight over 40 steps at 1e-5
    extraction, weight_decay = RewardConfig().extraction, OptimizerConfig().weight_decay

    data = Path(work["data"])
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    train = load_records(data / "train.jsonl")
    evals = load_records(data / "eval.jsonl")
    def prompt(problem: str) -> str:  # the demo's prompt (data.prompt_template), as plain text
        return PROMPT.replace("{problem}", problem)

    if work.get("same_order"):  # our seeded order (PromptData's own), one epoch is enough
        from megatron_trapo.data.items import PromptData
        train = [train[i] for i in PromptData(train, work["prompts"], work["seed"]).order(0)]
    ds = Dataset.from_list([{"prompt": prompt(r.problem), "answer": r.answer} for r in train])
    stops = stop_token_ids(tok)

    def reward(completions, answer, **_):
        return [verify_answer(c, a, extraction=extraction)  # the demo's reward.extraction
                for c, a in zip(completions, answer)]

    accuracy: Dict[int, float] = {}

    @torch.no_grad()
    def evaluate(model, step: int) -> None:
        was_training = model.training
        model.eval()
        tok.padding_side = "left"
        correct: Dict[str, List[float]] = {}  # per source: the demo's eval.average=sources
        for i in range(0, len(evals), 64):
            chunk = evals[i:i + 64]
            enc = tok([prompt(r.problem) for r in chunk], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=work["new_tokens"], do_sample=False,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id or stops[0])
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for t, r in zip(texts, chunk):
                correct.setdefault(r.source, []).append(grade_response(t, r.answer)["correct"])
        accuracy[step] = sum(sum(v) / len(v) for v in correct.values()) / len(correct)
        print(f"step {step}: held-out accuracy {accuracy[step]:.3f}", flush=True)
        model.train(was_training)

    class Eval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % work["every"] == 0 or state.global_step == work["steps"]:
                evaluate(model, state.global_step)

    cfg = GRPOConfig(output_dir=str(result.parent / f"trl_out_seed{work['seed']}"),
                     use_cpu=True, per_device_train_batch_size=work["prompts"] * work["group"],
                     num_generations=work["group"], gradient_accumulation_steps=1,
                     steps_per_generation=1, num_iterations=1,
                     max_completion_length=work["new_tokens"], temperature=1.0, top_p=1.0,
                     learning_rate=work["lr"], lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.999,
                     adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0, scale_rewards="none",
                     loss_type="dapo", shuffle_dataset=not work.get("same_order", False),
                     entropy_coef=0.001, max_steps=work["steps"], logging_steps=1,
                     save_strategy="no", report_to="none", seed=work["seed"],
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    evaluate(model, 0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Eval()])
    trainer.train()
    result.write_text(json.dumps(accuracy))
    return 0
