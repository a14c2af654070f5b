"""Multiple-choice grading (the paper's out-of-distribution benchmarks, ARC-c and MMLU-Pro):
the letter of the response's final answer against the right letter. Math graders do not serve
here: math-verify parses a lone letter as a symbol and ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``
or ``\\boxed{C. iron}`` as something else again."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from megatron_trapo.reward.math_reward import last_boxed

# a final answer that is a letter: "C", "(C)", "C.", "C)", "C: text", "C. text"
_LEADING_LETTER = re.compile(r"^\(?([A-J])(?:\)|[.:)]|\s|$)")
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
# without a \boxed{}: "the answer is (C)", "Answer: C"
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:：]?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)


def choice_letter(response: str) -> Optional[str]:
    """The letter the response answers with: its last ``\\boxed{}``, else its last "answer is
    X"; None when neither gives a letter A-J."""
    boxed = last_boxed(response)
    if boxed is not None:
        text = _WRAPPER.sub(r"\1", boxed).strip().strip("$").strip()
        m = _LEADING_LETTER.match(text)
        return m.group(1) if m else None
    found = _ANSWER_IS.findall(response)
    return found[-1].upper() if found else None


def grade_choice(response: str, gold: str) -> dict:
    """``{"extracted", "correct", "grader"}`` as the math grader returns them."""
    letter = choice_letter(response)
    if letter is None:
        return {"extracted": None, "correct": False, "grader": "no_answer"}
    return {"extracted": letter, "correct": letter == gold.strip().upper(), "grader": "choice"}


def grade_choices(pairs: Sequence[Tuple[str, str]]) -> List[dict]:
    return [grade_choice(response, gold) for response, gold in pairs]
