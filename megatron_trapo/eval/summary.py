"""The aggregation step: merge finished shards into ``samples.jsonl`` and write the summary —
per benchmark avg@k and unbiased pass@k (k = 1, 2, 4, …), the average over benchmarks, and
which grader decided — as ``summary.json`` and ``summary.md``. Incomplete results are refused,
naming the missing shards."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

from megatron_trapo.config import ConfigError
from megatron_trapo.eval.metrics import summarize
from megatron_trapo.eval.plan import load_plan, missing_shards
from megatron_trapo.eval.shards import read_jsonl, shard_path, write_atomic
from megatron_trapo.metrics import MetricsLogger


class IncompleteResults(ConfigError):
    """Some shards have no output; the message names them and how to rerun them."""


def collect(plan) -> List[dict]:
    """All sample rows, after checking that every shard is there and whole."""

    missing = missing_shards(plan)
    if missing:
        names = ", ".join(f"{s.index} ({s.name})" for s in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise IncompleteResults(
            f"{len(missing)} of {len(plan.shards)} shards have no results: {names}{more}. "
            f"Rerun them: `megatron-trapo eval-resubmit {plan.out_dir}` (Slurm) or "
            f"`megatron-trapo eval --config {plan.out_dir}/eval_config.yaml` (local)")
    rows = []
    for shard in plan.shards:
        got = read_jsonl(shard_path(plan.out_dir, shard))
        if [(r["problem_id"], r["sample_index"]) for r in got] != shard.keys():
            raise IncompleteResults(f"shard {shard.index} ({shard.name}) does not hold exactly "
                                    "its samples; delete its file and rerun it")
        rows.extend(got)
    order = {name: i for i, name in enumerate(plan.counts)}
    return sorted(rows, key=lambda r: (order[r["benchmark"]], r["problem_id"], r["sample_index"]))


def summarize_rows(rows: List[dict], benchmarks: List[str]) -> Dict:
    per: Dict[str, Dict] = {}
    for name in benchmarks:
        mine = [r for r in rows if r["benchmark"] == name]
        verdicts: Dict[int, List[bool]] = {}
        for r in sorted(mine, key=lambda r: (r["problem_id"], r["sample_index"])):
            verdicts.setdefault(r["problem_id"], []).append(bool(r["correct"]))
        stats = summarize(verdicts)
        k = int(stats["samples_per_problem"])
        graders = Counter(r["grader"] for r in mine)
        per[name] = {**stats, "k": k, "score": stats[f"avg@{k}"],
                     "graders": dict(sorted(graders.items())),
                     "truncated": sum(r["finish_reason"] == "length" for r in mine) / len(mine),
                     "prompt_too_long": sum(r["finish_reason"] == "prompt_too_long"
                                            for r in mine),
                     "mean_tokens": sum(r["num_tokens"] for r in mine) / len(mine)}
    common = set.intersection(*[{m for m in v if m.startswith("pass@")} for v in per.values()])
    average = {"score": sum(v["score"] for v in per.values()) / len(per)}
    for m in sorted(common, key=lambda m: int(m.split("@")[1])):
        average[m] = sum(v[m] for v in per.values()) / len(per)
    return {"benchmarks": per, "average": average}


def markdown(summary: Dict) -> str:
    """One row per benchmark and the average; ``score`` is avg@k (the paper's number:
    avg@32 for AIME/AMC, pass@1 = avg@1 elsewhere)."""
    per = summary["benchmarks"]
    passes = sorted({m for v in per.values() for m in v if m.startswith("pass@")},
                    key=lambda m: int(m.split("@")[1]))
    head = ["benchmark", "problems", "k", "score (avg@k)", *passes, "2nd grader", "no answer",
            "truncated", "prompt too long"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    for name, v in per.items():
        cells = [name, str(int(v["problems"])), str(v["k"]), pct(v["score"]),
                 *[pct(v[m]) if m in v else "" for m in passes],
                 str(v["graders"].get("prm800k", 0)), str(v["graders"].get("no_answer", 0)),
                 pct(v["truncated"]), str(v.get("prompt_too_long", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    avg = summary["average"]
    cells = ["**average**", "", "", pct(avg["score"]),
             *[pct(avg[m]) if m in avg else "" for m in passes], "", "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(out_dir: str | Path) -> Dict:
    """Merge the shards of ``out_dir`` and write samples.jsonl, summary.json, summary.md."""

    plan = load_plan(out_dir)
    rows = collect(plan)
    summary = summarize_rows(rows, list(plan.counts))
    summary["config"] = {k: getattr(plan.cfg, k) for k in
                         ("model_path", "load", "temperature", "top_p", "max_new_tokens", "seed")}
    out = plan.out_dir
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "summary.md", markdown(summary))
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    _log_metrics(out, summary)
    return summary


def _log_metrics(out: Path, summary: Dict) -> None:
    flat = {f"eval/{name}/{m}": v for name, s in summary["benchmarks"].items()
            for m, v in s.items() if isinstance(v, float)}
    flat.update({f"eval/average/{m}": v for m, v in summary["average"].items()})
    logger = MetricsLogger(out / "logs")
    logger.log(0, flat)
    logger.close()
