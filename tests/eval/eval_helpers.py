"""Helpers of the evaluation tests (a module of its own: ``conftest`` is a name that several
test folders use, so importing from it depends on collection order)."""
import json
import os
import subprocess
import sys
from pathlib import Path

# Two benchmarks, three problems each, k=2, short answers; 2 problems × 1 sample per shard.
EVAL_ARGS = ["benchmarks=[gsm8k,math500]", "limit=3", "k=2", "max_new_tokens=24",
             "problems_per_shard=2", "samples_per_shard=1", "seed=5", "grader_workers=1"]


def cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``megatron-trapo ARGS`` as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "megatron_trapo.cli", *args], text=True,
                          capture_output=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and proc.returncode != 0:
        raise AssertionError(f"megatron-trapo {' '.join(args)} failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return proc


def rows(out_dir: Path) -> list:
    with open(out_dir / "samples.jsonl") as f:
        return [json.loads(line) for line in f]


# What the tiny model learns to answer, whatever the problem: right for GSM8K problem 0 (18)
# and, through the second grader only, for problem 1 (3); wrong elsewhere; or no answer.
ANSWERS = [("The answer is \\boxed{18}.", 0.35), ("The answer is \\boxed{3}.", 0.2),
           ("The answer is \\boxed{\\text{3.0}}.", 0.25), ("I do not know.", 0.2)]


def teach_answers(model_dir: Path, steps: int = 120) -> None:
    """Fine-tune the random tiny model (≈ 7 s) so that its samples hold boxed answers and the
    evaluation's verdicts are a mix of right and wrong, not all "no answer"."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_trapo.data.prompts import render_prompt
    from megatron_trapo.eval import registry

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    problems = registry.get("gsm8k").load(limit=3) + registry.get("math500").load(limit=3)
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        pairs = []
        for _ in range(6):
            prompt = tok(render_prompt(tok, rng.choice(problems).problem),
                         add_special_tokens=False)["input_ids"]
            answer = rng.choices([a for a, _ in ANSWERS], [w for _, w in ANSWERS])[0]
            pairs.append((prompt, tok(answer, add_special_tokens=False)["input_ids"]
                          + [tok.eos_token_id]))
        length = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), length), tok.pad_token_id)
        labels = torch.full((len(pairs), length), -100)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[i, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)
