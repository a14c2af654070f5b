"""The CPU demo's task: multi-step arithmetic problems whose expert solutions show every
step and end in \\boxed{…} — generated here, so a laptop needs no dataset download.

Difficulty is the number of steps. Every intermediate value stays in 0–99 (a subtraction is
drawn only when it stays ≥ 0, a multiplication only when it stays < 100), so a step is one- or
two-digit arithmetic that a tiny model can learn; what makes a problem hard is the length of the
chain. The base model is "pretrained" on a mixture that thins out with the number of steps and
never shows the longest chains, so it is competent on one step, partly right in the middle and
almost never right on the hardest level — where free rollouts give GRPO no signal and expert
guidance is what TRAPO adds.
"""
from __future__ import annotations

import operator
import random
import re
from typing import AbstractSet, List, Mapping, Optional, Sequence, Tuple, Union

from megatron_trapo.data.prompts import INSTRUCTION, SYSTEM
from megatron_trapo.data.records import Record

_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
STYLES = ("main", "second")
# a step line of either style: "8 + 5 = 13." / "Now 8 + 5 gives 13."
STEP_LINE = re.compile(r"(?:=|gives) -?\d+\.")
MAX_VALUE = 99
_SOURCE = re.compile(r"synthetic-(\d+)step")


def _step(rng: random.Random, value: int, top: int) -> tuple:
    """One operation that keeps the value in 0..top."""
    choices = ["+"] if value + 1 <= top else []
    if value >= 1:
        choices.append("-")
    if 2 <= value and value * 2 <= top:
        choices.append("*")
    sym = rng.choice(choices)
    if sym == "+":
        operand = rng.randint(1, min(9, top - value))
    elif sym == "-":
        operand = rng.randint(1, min(9, value))
    else:
        operand = rng.randint(2, 3 if value * 3 <= top else 2)
    return sym, operand, _APPLY[sym](value, operand)


Slips = Tuple[float, float]  # per solution style (terse, "We go step by step")


def make_problem(rng: random.Random, steps: int, index: int, split: str,
                 max_value: int = MAX_VALUE, slip: Slips = (0.0, 0.0)) -> Record:
    """One problem and its two solutions. ``slip``: per style, the chance that a solution
    writes a step's result off by one or two (each step drawn apart); the solution goes on from
    the value it wrote, so a slipped solution is a consistent one with a wrong answer — a
    teacher who errs now and then, and more often in one style than the other, as the text a
    real base model learned from does (which style to write is then a choice RL can learn)."""
    value = rng.randint(2, min(12, max_value))
    start, text, ops = value, [f"Start with {value}."], []
    for _ in range(steps):
        sym, operand, new = _step(rng, value, max_value)
        text.append(f"{_WORDS[sym]} {operand}.")
        ops.append((sym, operand))
        value = new
    text.append("What is the result?")
    answer = str(value)
    main, second = (_solution(rng, start, ops, p, style) for p, style in zip(slip, STYLES))
    return Record(" ".join(text), answer, [main, second], f"{split}-{index}", source_of(steps))


def source_of(steps: int) -> str:
    """A problem's source, which names its difficulty: ``synthetic-{steps}step``."""
    return f"synthetic-{steps}step"


def level_of(source: str) -> Optional[int]:
    """The number of steps a :func:`source_of` name gives; None for any other source."""
    m = _SOURCE.fullmatch(source)
    return int(m.group(1)) if m else None


def _solution(rng: random.Random, value: int, ops: Sequence[tuple], slip: float,
              style: str) -> str:
    lines = [] if style == "main" else ["We go step by step."]
    for sym, operand in ops:
        new = _APPLY[sym](value, operand)
        if slip and rng.random() < slip:
            new += rng.choice((-2, -1, 1, 2))
        lines.append(f"{value} {sym} {operand} = {new}." if style == "main"
                     else f"Now {value} {sym} {operand} gives {new}.")
        value = new
    return "\n\n".join(lines + [answer_line(value, style)])


def answer_line(value: object, style: str = "main") -> str:
    """A solution's last line, in ``style``'s words (the demo's answers-only pretraining text
    is this line alone)."""
    end = "The answer is" if style == "main" else "So the result is"
    return f"{end} \\boxed{{{value}}}."


def make_split(n: int, seed: int, steps: Union[Sequence[int], Mapping[int, float]],
               split: str, max_value: int = MAX_VALUE, exclude: AbstractSet[str] = frozenset(),
               slip: Slips = (0.0, 0.0)) -> List[Record]:
    """``n`` problems; ``steps`` lists the levels (drawn uniformly) or maps each level to its
    weight in the mixture; every value stays in 0..``max_value``. A problem whose text is in
    ``exclude`` (the held-out split's) is drawn again at the same level: there are only a few hundred distinct
    one-step problems, and a held-out one seen in training would measure memory."""
    rng = random.Random(f"{split}-{seed}")
    weights = dict(steps) if isinstance(steps, Mapping) else {s: 1.0 for s in steps}
    levels, w = list(weights), list(weights.values())
    out: List[Record] = []
    for i in range(n):
        level = rng.choices(levels, w)[0]
        for _ in range(1000):  # the level is kept: a redraw must not thin out the mixture
            r = make_problem(rng, level, i, split, max_value, slip)
            if r.problem not in exclude:
                break
        else:
            raise ValueError(f"make_split({split!r}): every {level}-step problem drawn is "
                             "in the excluded (held-out) set; use fewer held-out problems")
        out.append(r)
    return out


def steps_written(text: str) -> int:
    """How many step lines an answer writes, in either solution style."""
    return len(STEP_LINE.findall(text))


def tokenizer_corpus(records: Sequence[Record]) -> List[str]:
    """The problems and solutions, with the fixed prompt words weighted as often as they
    occur in training (so that BPE gives them whole-word tokens: a shorter prompt is a cheaper
    step for a tiny model)."""
    texts = []
    for r in records:
        texts += [r.problem] + r.solutions
    return texts + [SYSTEM, INSTRUCTION, "system\nuser\nassistant\n"] * max(len(records), 1)
