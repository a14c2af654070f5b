"""The CPU demo's task: multi-step arithmetic problems whose expert solutions show every
step and end in \\boxed{…} — generated here, so a laptop needs no dataset download.

Difficulty is the number of steps (1–4). Easy problems (1–2 steps) "pretrain" the tiny base
model; the training and held-out splits mix all difficulties, so the base solves some (mostly
one-step) and almost never the four-step ones — where free rollouts give GRPO no signal and
expert guidance is what TRAPO adds.
"""
from __future__ import annotations

import random
from typing import List, Sequence

from megatron_trapo.data.prompts import INSTRUCTION, SYSTEM
from megatron_trapo.data.records import Record

_OPS = (("Add", "+"), ("Subtract", "-"), ("Multiply by", "*"))


def make_problem(rng: random.Random, steps: int, index: int, split: str) -> Record:
    value = rng.randint(2, 12)
    text = [f"Start with {value}."]
    lines, alt = [], []
    for _ in range(steps):
        word, sym = rng.choice(_OPS)
        operand = rng.randint(2, 3) if sym == "*" else rng.randint(1, 9)
        new = value + operand if sym == "+" else value - operand if sym == "-" else value * operand
        text.append(f"{word} {operand}.")
        lines.append(f"{value} {sym} {operand} = {new}.")
        alt.append(f"Now {value} {sym} {operand} gives {new}.")
        value = new
    text.append("What is the result?")
    answer = str(value)
    main = "\n\n".join(lines + [f"The answer is \\boxed{{{answer}}}."])
    second = "\n\n".join(["We go step by step."] + alt + [f"So the result is \\boxed{{{answer}}}."])
    return Record(" ".join(text), answer, [main, second], f"{split}-{index}", f"synthetic-{steps}step")


def make_split(n: int, seed: int, steps: Sequence[int], split: str) -> List[Record]:
    rng = random.Random(f"{split}-{seed}")
    return [make_problem(rng, rng.choice(list(steps)), i, split) for i in range(n)]


def tokenizer_corpus(records: Sequence[Record]) -> List[str]:
    texts = [SYSTEM, INSTRUCTION]
    for r in records:
        texts += [r.problem] + r.solutions
    return texts
