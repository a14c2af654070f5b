"""Converters from public dataset layouts to :class:`Record` s, with a report of every skipped
row and why (never a silent drop).

- ``openr1``: OpenR1-Math-220k rows — ``problem``, ``answer``, ``generations`` (list) and
  ``correctness_math_verify`` (list of bools): the verified generations are the expert traces.
- ``luffy``: the LUFFY/TRAPO parquet layout — ``prompt`` (chat messages), ``target``
  ([{role, content}]) or ``extra_info.answer_list``, ``reward_model.ground_truth``. A row
  with an answer list takes its traces from it (the reference's TRAPO: trace 0 for the first
  micro-groups, trace 1 for the last), else the target.
- ``gsm8k``: GSM8K rows — ``question`` and ``answer`` (the rationale with ``<<…>>`` calculator
  marks, then ``#### <final answer>``): the final answer is the ground truth, the rationale
  without the marks and ending in ``\boxed{<answer>}`` the expert solution.
- ``math``: MATH / MATH-500 rows — ``problem`` and ``solution``: the ground truth is the
  content of the solution's last ``\boxed{}`` (a row's own ``answer`` field is not needed), the
  solution itself the expert solution.
- ``jsonl``: plain rows with ``problem``, ``answer`` and ``solutions`` (list) or ``solution``;
  other field names through a mapping.
Expert texts are kept whole (reasoning, </think> and final solution): which part a method
trains on is chosen when a run encodes them (``data.expert_text``, ``Method.expert_text``).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from megatron_trapo.config import ConfigError
from megatron_trapo.data.prompts import INSTRUCTION
from megatron_trapo.data.records import Record
from megatron_trapo.reward.math_reward import last_boxed

FORMATS = ("openr1", "luffy", "gsm8k", "math", "jsonl")
_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


@dataclass
class Report:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def skip(self, reason: str, row_id: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row_id)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "examples": self.examples}


def _openr1(row: dict) -> Tuple[Optional[Record], Optional[str]]:
    gens = row.get("generations") or []
    ok = row.get("correctness_math_verify") or []
    sols = [g.strip() for g, good in zip(gens, ok) if good and isinstance(g, str)]
    return Record(row.get("problem") or "", str(row.get("answer") or ""), sols,
                  row.get("uuid") or row.get("id"), row.get("source")), None


def _luffy(row: dict) -> Tuple[Optional[Record], Optional[str]]:
    prompt = row.get("prompt") or []
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return None, "no_user_message"
    problem = users[-1].replace(INSTRUCTION, "").strip()
    # the reference's TRAPO reads extra_info.answer_list ([0] for micro-groups 1-3, [1] for
    # the last, rl_dataset_with_target.py:192-212); LUFFY's rows have the target only
    extra = row.get("extra_info") or {}
    sols = [s for s in (extra.get("answer_list") or []) if isinstance(s, str) and s.strip()]
    if not sols:
        target = row.get("target") or []
        sols = [t.get("content", "") for t in target if isinstance(t, dict) and t.get("content")]
    answer = str((row.get("reward_model") or {}).get("ground_truth") or "")
    return Record(problem, answer, [s.strip() for s in sols],
                  str(extra.get("index")) if extra.get("index") is not None else None,
                  row.get("data_source")), None


def gsm8k_final_answer(answer_field: str) -> Optional[str]:
    """The number after GSM8K's ``####`` (thousands separators dropped), None without one."""
    if "####" not in answer_field:
        return None
    final = answer_field.split("####")[-1].strip()
    return final.replace(",", "") if _THOUSANDS.match(final) else final


def _gsm8k(row: dict) -> Tuple[Optional[Record], Optional[str]]:
    text = str(row.get("answer") or "")
    final = gsm8k_final_answer(text)
    if not final:
        return None, "no_final_answer"
    rationale = _CALCULATOR_MARK.sub("", text.split("####")[0]).strip()
    solution = f"{rationale}\nThe answer is $\\boxed{{{final}}}$."
    rid = row.get("idx", row.get("id"))
    return Record(str(row.get("question") or ""), final, [solution],
                  None if rid is None else str(rid), "gsm8k"), None


def _math(row: dict) -> Tuple[Optional[Record], Optional[str]]:
    solution = str(row.get("solution") or "")
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        return None, "no_boxed_answer_in_solution"
    return Record(str(row.get("problem") or ""), boxed.strip(), [solution],
                  row.get("unique_id") or row.get("id"), row.get("subject") or row.get("type")), None


def _plain(mapping: Dict[str, str]) -> Callable:
    def convert(row: dict):
        get = lambda k: row.get(mapping.get(k, k))  # noqa: E731
        sols = get("solutions")
        if sols is None and get("solution") is not None:
            sols = [get("solution")]
        if isinstance(sols, str):
            sols = [sols]
        return Record(str(get("problem") or ""), str(get("answer") or ""),
                      [s.strip() for s in (sols or []) if isinstance(s, str)],
                      get("id"), get("source")), None
    return convert


def converter(fmt: str, mapping: Optional[Dict[str, str]] = None) -> Callable:
    if fmt == "openr1":
        return _openr1
    if fmt == "luffy":
        return _luffy
    if fmt == "gsm8k":
        return _gsm8k
    if fmt == "math":
        return _math
    if fmt == "jsonl":
        return _plain(mapping or {})
    raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


def convert_rows(rows: Iterable[dict], fmt: str, mapping: Optional[Dict[str, str]] = None,
                 prompt_length: Optional[Callable[[str], int]] = None,
                 max_prompt_length: Optional[int] = None,
                 require_solution: bool = True) -> Tuple[List[Record], Report]:
    """Convert rows; skip (and count) rows with no answer, no usable solution or a prompt over
    ``max_prompt_length`` tokens (measured by ``prompt_length``)."""
    conv = converter(fmt, mapping)
    report, out = Report(), []
    for i, row in enumerate(rows):
        rid = str(row.get("id") or row.get("uuid") or i)
        rec, reason = conv(row)
        if reason is None and not rec.problem.strip():
            reason = "no_problem"
        if reason is None and not rec.answer.strip():
            reason = "no_answer"
        if reason is None and require_solution and not any(s.strip() for s in rec.solutions):
            reason = "no_usable_solution"
        if reason is None and max_prompt_length is not None and prompt_length is not None \
                and prompt_length(rec.problem) > max_prompt_length:
            reason = "prompt_too_long"
        if reason is not None:
            report.skip(reason, rid)
            continue
        rec.id = rec.id if rec.id is not None else rid
        out.append(rec)
        report.kept += 1
    return out, report
