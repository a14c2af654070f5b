"""Prompt rendering with the paper's instruction, and the expert text TRAPO trains on."""
from __future__ import annotations

import re
from typing import List, Optional

from megatron_trapo.config import ConfigError

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def expert_text(solution: str) -> str:
    """The reasoning inside <think>…</think> when present, else the whole solution."""
    m = _THINK.search(solution)
    return m.group(1).strip() if m else solution.strip()


def messages(problem: str, system: Optional[str] = SYSTEM) -> List[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]


def plain_prompt(problem: str, system: Optional[str] = None) -> str:
    """The prompt text without a chat template (base models, or a tokenizer without one)."""
    head = f"{system}\n\n" if system else ""
    return f"{head}{problem}\n{INSTRUCTION}\n"


def render_prompt(tokenizer, problem: str, system: Optional[str] = SYSTEM) -> str:
    """The prompt text through the tokenizer's chat template (generation prompt appended)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages(problem, system), tokenize=False,
                                             add_generation_prompt=True)
    return plain_prompt(problem, system)


def prompt_ids(tokenizer, problem: str, template: str = "auto",
               system: Optional[str] = SYSTEM) -> List[int]:
    """The prompt's token ids — one rendering for training, the trainer's held-out evaluation
    and ``megatron-trapo eval``. ``template``: ``auto`` (the chat template when the tokenizer
    has one, else the plain prompt with the system line: what training uses), ``chat`` (the
    chat template, required), ``plain`` (no template, no system line) or a text holding
    ``{problem}``."""
    if template in ("auto", "chat"):
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_template=chat but the tokenizer has no chat template; "
                              "use prompt_template=plain or a text with {problem}")
        return tokenizer(render_prompt(tokenizer, problem, system),
                         add_special_tokens=False)["input_ids"]
    if template == "plain":
        text = plain_prompt(problem)
    else:  # str.replace, not format: templates hold LaTeX braces such as \boxed{}
        text = template.replace("{problem}", problem)
    return tokenizer(text)["input_ids"]
