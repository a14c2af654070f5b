"""The demo's results: ``results.md`` (commit, command, sizes, learning rates and how they were
chosen, wall time, the table overall and per difficulty, TRAPO paired against each method),
``results.json`` and the two figures."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_trapo.cpu_demo.plots import plot_accuracy, plot_training
from megatron_trapo.cpu_demo.stage import MODEL, final
from megatron_trapo.cpu_demo.stats import (by_source, final_rows, gain_over, mean_std, paired,
                                           read_final_eval, right_length_share, worked_share)
from megatron_trapo.data.records import load_records

SCHEDULE = ("trapo", "trapo_prefix_context", "trapo_plain_sft", "trapo_luffy_prefix")


def git_commit() -> str:
    """The short commit, with ``+changes`` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+changes" if dirty else "")) if head else "unknown"


def collect(out: Path, runs: Dict[str, Sequence[Path]], sources: Dict[str, str]
            ) -> Dict[str, dict]:
    """Per method: final held-out accuracy per seed, overall and per difficulty, and the
    per-problem correctness the paired comparison needs (``sources``: problem id → level)."""
    result: Dict[str, dict] = {"base": {"runs": [out / "runs" / "base"]}}
    result.update({m: {"runs": list(paths)} for m, paths in runs.items()})
    for entry in result.values():
        rows = [final_rows(p / "logs" / "eval_samples.jsonl") for p in entry["runs"]]
        entry["correct"] = [read_final_eval(r) for r in rows]
        entry["accuracy"] = [final(p)["last_eval"]["eval/accuracy"] for p in entry["runs"]]
        entry["by_level"] = [by_source(c, sources) for c in entry["correct"]]
        entry["right_length"] = [right_length_share(r, sources) for r in rows]
        entry["worked"] = [worked_share(r, sources) for r in rows]
    return result


def table(result: Dict[str, dict], levels: List[str]) -> List[str]:
    head = "| method | held-out accuracy | " + " | ".join(levels) + " | seeds |"
    lines = [head, "|---" * (len(levels) + 3) + "|"]
    for method, entry in result.items():
        m, s = mean_std(entry["accuracy"])
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}"]
        for lv in levels:
            lm, ls = mean_std([b.get(lv, 0.0) for b in entry["by_level"]])
            cells.append(f"{100 * lm:.1f} ± {100 * ls:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(entry['accuracy'])} |")
    return lines


def above_base(result: Dict[str, dict]) -> List[str]:
    """Each method's gain over the base in units of its seed std (the issue's bar for "RL
    works": GRPO above the base by more than 3 of its stds); nothing with one seed."""
    base = result["base"]["accuracy"][0]
    cells = []
    for method, entry in result.items():
        if method != "base" and len(entry["accuracy"]) > 1:
            gain, std, ratio = gain_over(base, entry["accuracy"])
            cells.append(f"{method} {100 * gain:+.1f} (std {100 * std:.1f}, {ratio:+.1f}×)")
    return ["- gain over the base, points (seed std, gain in stds): " + "; ".join(cells), ""] \
        if cells else []


def share_table(result: Dict[str, dict], levels: List[str], key: str) -> List[str]:
    """A share of the answers per difficulty (``key``: ``right_length``, ``worked``)."""
    lines = ["| method | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for method, entry in result.items():
        cells = []
        for lv in levels:
            m, s = mean_std([b.get(lv, 0.0) for b in entry[key]])
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def paired_table(result: Dict[str, dict], sources: Dict[str, str]) -> List[str]:
    if "trapo" not in result:
        return []
    lines = ["| TRAPO − method | difference, points [95% bootstrap CI] | only TRAPO / only "
             "method right | sign test p |", "|---|---|---|---|"]
    a = result["trapo"]["correct"]
    for method, entry in result.items():
        if method == "trapo":
            continue
        b = entry["correct"] * len(a) if method == "base" else entry["correct"]
        lines.append(f"| {method} | {paired(a, b, strata=sources).row()} |")
    return lines


def write(out: Path, runs: Dict[str, Sequence[Path]], sizes, lrs: Dict[str, float],
          tuning: Optional[dict], argv: List[str], wall_s: float, grid: Sequence[float]
          ) -> None:
    sources = {r.id: r.source for r in load_records(out / "data" / "eval.jsonl")}
    result = collect(out, runs, sources)
    levels = sorted({lv for e in result.values() for b in e["by_level"] for lv in b},
                    key=lambda s: (len(s), s))
    offset = {"sft_then_rl": sizes.iters}  # its RL stage starts after the SFT run's steps
    plot_accuracy(out, runs, levels, offset)
    plot_training(out, runs, offset, SCHEDULE)
    how = ("chosen by `--tune` in this run from " if tuning else
           "fixed in `cpu_demo/compare.py` (LR), chosen earlier by `--tune` from ")
    seeds = max(len(p) for p in runs.values())
    md = [f"# CPU demo: Table 1 at CPU scale ({seeds} seed{'s' * (seeds > 1)})", "",
          f"- commit `{git_commit()}`; command `python -m megatron_trapo.cpu_demo.compare "
          f"{' '.join(argv)}`; wall time {wall_s / 60:.1f} min",
          f"- model {json.dumps(MODEL)}",
          f"- sizes {json.dumps(dataclasses.asdict(sizes))}",
          "- learning rates " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()) + "; " + how
          + f"the grid {', '.join(f'{g:g}' for g in grid)} (seed 1, the same steps) by accuracy "
          "on training-distribution problems no run trains on (`data/tune_probe.jsonl`, "
          "levels 2-5), never on held-out ones; the "
          "ablation rows take TRAPO's",
          "- every method trains the same number of optimizer steps from the base; "
          "SFT-then-RL is GRPO from the SFT run (so its curve starts at the SFT run's end)",
          "- held-out accuracy on `data/eval.jsonl` at the last step: "
          + (f"avg@{sizes.eval_k} (pass@1 averaged over {sizes.eval_k} samples per problem) "
             f"at temperature {sizes.eval_temperature:g}, as the paper samples"
             if sizes.eval_temperature else "greedy decoding")
          + "; overall = the mean of the levels' accuracies (each level weighs the same; "
          + ", ".join(f"{n} {lv}" for lv, n in sorted(Counter(sources.values()).items()))
          + " problems); mean ± std over seeds", "", *table(result, levels), "", *above_base(result)]
    md += ["Answers that show their working (%, last evaluation): the base's habit of "
           "answering without it is what RL can drop", "", *share_table(result, levels, "worked"),
           "", "Answers that write as many steps as the problem has (%, last evaluation): a "
           "wrong number of steps is how the base fails the chains it was never shown", "",
           *share_table(result, levels, "right_length"), ""]
    pairs = paired_table(result, sources)
    if pairs:
        md += ["TRAPO against each method on the same seeds and held-out problems:", "",
               *pairs, ""]
    md += ["![held-out accuracy](accuracy.png)", "", "![training](training.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(
        {m: {"accuracy": e["accuracy"], "by_level": e["by_level"],
             "right_length": e["right_length"], "worked": e["worked"],
             "runs": [str(p) for p in e["runs"]]} for m, e in result.items()}, indent=2))
    print("\n".join(md[:-3]))
    print(f"wrote {out / 'results.md'}, results.json, accuracy.png and training.png "
          f"in {wall_s / 60:.1f} min")
