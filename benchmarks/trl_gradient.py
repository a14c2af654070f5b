"""One GRPO batch's gradient, three ways, against an exact reference (``bench_vs_trl.py
--gradient``): does our step differentiate what TRL's ``GRPOTrainer`` differentiates?

    .venv/bin/python benchmarks/bench_vs_trl.py --gradient --base runs/cpu_demo/runs/base/ckpt \
        [--out runs/cpu_demo]

1. TRL (fp32, ``bf16=False``) generates one step's batch from the CPU demo's base — our
   seed-1 step-0 prompts, 16 × 8 samples, the learning comparison's GRPOConfig — and takes
   the gradient of its ``compute_loss`` (dapo token-mean, no std scaling, entropy bonus 0.001).
2. TRL again on the same inputs with GRPOConfig's default ``bf16=True`` (on a CPU: its forward
   and backward under bf16 autocast over fp32 weights).
3. Ours: the demo's GRPO config, one ``trapo_step`` in one process whose rollouts are TRL's
   samples (the step's ``sample_groups`` is replaced by one returning them; everything after —
   advantages, masks, micro-batches, normaliser, Megatron forward/backward — is the real step),
   the gradient read from the DDP buffers before the optimizer step.
4. The reference: the HF model in float64, each sample alone (no padding), the GRPO loss
   written out by hand.

Printed: each gradient's 1 − cosine with the reference and its norm over the reference's − 1
(measured on the demo's base: the reference without the stop token in the loss is +2.1e-2 in
the norm, without the entropy bonus 1.5e-6 in 1 − cosine and +3.8e-4 in the norm).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

PROMPTS, GROUP, NEW_TOKENS, ENTROPY = 16, 8, 96, 0.001


def main(out: Path, base: str) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from trl_learning import export_base  # lazy: as bench_vs_trl's other modes

    demo, hf, _ = export_base(out, base)
    out = out.resolve() / "gradient"
    out.mkdir(parents=True, exist_ok=True)
    batch = out / "trl_fp32.pt"
    here = str(Path(__file__).resolve())
    for precision, inputs in (("fp32", None), ("bf16", batch)):
        cmd = [sys.executable, here, "trl", str(demo), str(hf), str(out / f"trl_{precision}.pt"),
               precision] + ([str(inputs)] if inputs else [])
        _run(cmd, out / f"trl_{precision}.log")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           here, "ours", str(demo), str(batch), str(out / "ours.pt")]
    _run(cmd, out / "ours.log")
    samples = torch.load(batch)["samples"]
    ref = reference_gradient(hf, samples)
    rows = [("ours (Megatron-Core step, fp32)", torch.load(out / "ours.pt")),
            ("TRL GRPOTrainer, bf16=False", torch.load(batch)["grads"]),
            ("TRL GRPOTrainer, bf16=True (GRPOConfig's default)",
             torch.load(out / "trl_bf16.pt")["grads"])]
    tokens = sum(len(s["completion_ids"]) for s in samples)
    lines = [f"# One GRPO batch's gradient vs a float64 reference ({len(samples)} samples, "
             f"{tokens} completion tokens, from the CPU demo's base)", "",
             "| gradient | 1 − cosine with the reference | norm / reference norm − 1 |",
             "|---|---|---|"]
    for name, grads in rows:
        cos, ratio = compare(grads, ref)
        lines.append(f"| {name} | {1 - cos:.1e} | {ratio - 1:+.1e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out / 'results.md'}")
    return 0


def _run(cmd: List[str], log: Path) -> None:
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])}… failed; see {log}")


def compare(grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> tuple:
    """(cosine, norm ratio) of the whole gradient over every reference tensor; a tensor
    missing from ``grads`` is an error, not a skip."""
    missing = sorted(set(ref) - set(grads))
    if missing:
        raise SystemExit(f"gradient lacks {missing[:3]} ({len(missing)} tensors)")
    dot = sum(float((grads[n].double() * g).sum()) for n, g in ref.items())
    a = sum(float((grads[n].double() ** 2).sum()) for n in ref)
    b = sum(float((g ** 2).sum()) for g in ref.values())
    return dot / (a * b) ** 0.5, (a / b) ** 0.5


def reference_gradient(hf: Path, samples: List[dict]) -> Dict[str, torch.Tensor]:
    """The exact gradient of the GRPO loss as it is meant: Σ −A·exp(lp − sg(lp)) − c·H over
    every completion token, ÷ the batch's completion tokens; float64, one sample at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64)
    n = sum(len(s["completion_ids"]) for s in samples)
    for s in samples:
        p, c = s["prompt_ids"], s["completion_ids"]
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        lsm = torch.log_softmax(logits, -1)
        lp = lsm.gather(1, torch.tensor(c)[:, None]).squeeze(1)
        entropy = -(lsm.exp() * lsm).sum(-1)
        ((-s["advantage"] * torch.exp(lp - lp.detach()) - ENTROPY * entropy).sum() / n).backward()
    return {k: p.grad for k, p in model.named_parameters()}


def trl_side(demo: Path, hf: str, result: Path, precision: str, inputs_file: str = "") -> None:
    """TRL's gradient of one batch: generated here (fp32), or ``inputs_file``'s batch."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from megatron_trapo.cpu_demo.compare import PROMPT
    from megatron_trapo.data.items import PromptData
    from megatron_trapo.data.records import load_records
    from megatron_trapo.reward.math_reward import verify_answer

    tok = AutoTokenizer.from_pretrained(demo / "data" / "tokenizer")
    train = load_records(demo / "data" / "train.jsonl")
    rows = [train[i] for i in PromptData(train, PROMPTS, 1).order(0)[:PROMPTS]]  # seed 1, step 0
    ds = Dataset.from_list([{"prompt": PROMPT.replace("{problem}", r.problem), "answer": r.answer}
                            for r in rows])

    def reward(completions, answer, **_):
        return [verify_answer(c, a, extraction="last_boxed")  # the demo's reward.extraction
                for c, a in zip(completions, answer)]

    cfg = GRPOConfig(output_dir=str(result.parent / "trl_out"), use_cpu=True,
                     per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                     gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
                     max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
                     learning_rate=1e-5, beta=0.0, scale_rewards="none", loss_type="dapo",
                     entropy_coef=ENTROPY, shuffle_dataset=False, max_steps=1,
                     report_to="none", seed=1, bf16=precision == "bf16")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), not called here
    model = trainer.model  # as accelerate prepared it (its forward autocast when bf16)
    model.train()
    if inputs_file:
        inputs = torch.load(inputs_file)["inputs"]
    else:
        torch.manual_seed(1)
        inputs = trainer._generate_and_score_completions([ds[i] for i in range(PROMPTS)
                                                          for _ in range(GROUP)])
        inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    pm, cm = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    samples = [{"prompt_ids": inputs["prompt_ids"][i][pm[i]].tolist(),
                "completion_ids": inputs["completion_ids"][i][cm[i]].tolist(),
                "advantage": float(inputs["advantages"][i])} for i in range(len(pm))]
    torch.save({"inputs": inputs, "samples": samples,
                "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}},
               result)


def our_side(demo: Path, batch_file: str, result: Path) -> None:
    """Our gradient of TRL's batch: the demo's GRPO step (one process), its rollouts replaced
    by TRL's samples, read before the optimizer step and mapped to HF names."""
    import megatron_trapo.train.step as step_module
    from megatron_trapo.algorithms.trajectory import Trajectory
    from megatron_trapo.config import TrainConfig, load_config
    from megatron_trapo.cpu_demo.compare import common
    from megatron_trapo.cpu_demo.stage import MODEL, _value
    from megatron_trapo.cpu_demo.task import FULL
    from megatron_trapo.models.hf.mapping import expand, rule_for_key, to_hf
    from megatron_trapo.models.sharding import gather_global
    from megatron_trapo.train.trainer import setup

    samples = torch.load(batch_file)["samples"]
    data, work = demo / "data", result.parent / "ours_run"
    overrides = {**MODEL, **common(data, FULL), "load": demo / "runs" / "base" / "ckpt",
                 "train_data": data / "train.jsonl", "eval.data": data / "eval.jsonl",
                 "loss.loss_mode": "grpo", "prompts_per_step": PROMPTS, "train_iters": 1,
                 "optimizer.lr": 1e-5, "seed": 1, "eval.interval": 0,
                 "log_dir": work / "logs", "checkpoint.save": work / "ckpt"}
    cfg = load_config(TrainConfig, None, [f"{k}={_value(v)}" for k, v in overrides.items()])
    run, _, _ = setup(cfg, resume=False, overwrite=True)

    def trl_samples(items, *args, **kwargs):  # the group-relative advantage of a group whose
        groups = []                           # rewards are TRL's advantages is that advantage
        for g in range(len(items)):
            groups.append([Trajectory(prompt_index=g, prompt_ids=s["prompt_ids"], prefix_ids=[],
                                      completion_ids=s["completion_ids"],
                                      rollout_logprobs=[0.0] * len(s["completion_ids"]),
                                      train_prefix=False, reward=s["advantage"])
                           for s in samples[GROUP * g:GROUP * (g + 1)]])
        return groups

    step_module.sample_groups = trl_samples
    grads: Dict[str, torch.Tensor] = {}
    optimizer_step = run.optimizer.step

    def read_then_step():  # named as the checkpoint names them, which the HF mapping reads
        grads.update(gather_global(run.ddp, "grad"))
        return optimizer_step()

    run.optimizer.step = read_then_step
    step_module.trapo_step(run, 0)
    hf_grads = {}
    for name, grad in grads.items():
        rule, layer = rule_for_key(run.model, name)
        hf_grads.update(zip(expand(rule, layer)[1], to_hf(rule.kind, grad, run.model)))
    torch.save(hf_grads, result)


if __name__ == "__main__":
    side, *rest = sys.argv[1:]
    if side == "trl":
        trl_side(Path(rest[0]), rest[1], Path(rest[2]), rest[3], *rest[4:])
    else:
        our_side(Path(rest[0]), rest[1], Path(rest[2]))
