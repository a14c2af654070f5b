"""Training records as the sampler needs them — the prompt rendered and tokenised, every expert
solution tokenised, each solution token's text (for the "\\n\\n" prefix-snapping rule) — and
their seeded order over the steps."""
from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_trapo.config import ConfigError
from megatron_trapo.data.prompts import SYSTEM, expert_text, prompt_ids
from megatron_trapo.data.records import Record


@dataclass
class PromptItem:
    record: Record
    prompt_ids: List[int]
    traces: List[List[int]]  # expert solutions, tokenised
    trace_texts: List[List[str]]  # each token's text, for the "\n\n" snapping rule


def encode(records: Sequence[Record], tokenizer, template: str = "auto",
           system: Optional[str] = SYSTEM, text: str = "reasoning") -> List[PromptItem]:
    """``template``/``system``: how the problem becomes a prompt (``data.prompts.prompt_ids``);
    ``text``: which text of each expert solution is tokenised — ``reasoning`` (inside
    <think>…</think> when present) or ``full`` (the whole target)."""
    items = []
    piece = token_texts(tokenizer)
    for r in records:
        prompt = prompt_ids(tokenizer, r.problem, template, system)
        sols = [expert_text(s) if text == "reasoning" else s.strip() for s in r.solutions]
        traces = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sols]
        texts = [[piece[t] if t in piece else piece.setdefault(t, tokenizer.decode([t]))
                  for t in tr] for tr in traces]
        items.append(PromptItem(r, prompt, traces, texts))
    return items


_TOKEN_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> Dict[int, str]:
    """The tokenizer's memo of each token's text (``decode([t])``, a function of ``t`` alone):
    decoding every solution token on its own was most of the data check's time at start-up
    (the CPU demo's 9000 pretraining problems: 4.3 s on every rank, 1.7 s with the memo)."""
    return _TOKEN_TEXTS.setdefault(tokenizer, {})


class PromptData:
    """Training prompts in a fixed, seeded order: step k's prompts depend only on (seed, k), so
    the data position of a resumed run is its step."""

    def __init__(self, items: List[PromptItem], prompts_per_step: int, seed: int):
        if not items:
            raise ConfigError("train_data holds no usable records")
        self.items, self.n, self.seed = items, prompts_per_step, seed
        self._orders: Dict[int, List[int]] = {}

    def order(self, epoch: int) -> List[int]:
        """The epoch's seeded permutation (kept: a step needs one or two of them)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def batch(self, step: int) -> List[PromptItem]:
        out = []
        for k in range(step * self.n, (step + 1) * self.n):
            epoch, pos = divmod(k, len(self.items))
            out.append(self.items[self.order(epoch)[pos]])
        return out
