"""Evaluation overheads, apart from generation: grading throughput (math-verify, and the
second grader where math-verify says wrong) on real benchmark answers, and — when a Slurm
cluster answers — the wall time of a job array of N no-op shards plus its aggregation job.

    .venv/bin/python benchmarks/bench_eval.py [--workers 2] [--rows 200] [--slurm-tasks 8]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path


def bench_grading(workers: int, rows: int) -> None:
    from megatron_trapo.eval import registry
    from megatron_trapo.reward.grading import Grader

    pairs = []
    for name in ("math500", "olympiadbench", "minerva", "gsm8k"):
        for p in registry.get(name).load(limit=rows // 4):
            pairs.append((f"... so the answer is $\\boxed{{{p.answer}}}$.", p.answer))  # right
            pairs.append((f"... so the answer is $\\boxed{{\\text{{{p.answer}}}}}$.", p.answer))
            pairs.append(("... so the answer is $\\boxed{-7}$.", p.answer))  # wrong: both asked
    with Grader(num_workers=workers, timeout_s=10) as grader:
        grader.grade(pairs[:4])  # workers up
        t0 = time.perf_counter()
        grades = grader.grade(pairs)
        dt = time.perf_counter() - t0
    by = {}
    for g in grades:
        by[g["grader"]] = by.get(g["grader"], 0) + 1
    print(f"grading: {len(pairs)} answers in {dt:.1f} s = {len(pairs) / dt:.0f} answers/s "
          f"with {workers} workers; decided by {by}; timeouts {grader.timeouts}")


def bench_slurm(tasks: int) -> None:
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        print("slurm: no cluster answers (source <(bash scripts/ci/start_local_slurm.sh))")
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        arr = subprocess.run(["sbatch", "--parsable", f"--array=0-{tasks - 1}", "-o",
                              f"{tmp}/%a.out", "--wrap", "true"], capture_output=True,
                             text=True, check=True).stdout.strip()
        agg = subprocess.run(["sbatch", "--parsable", f"--dependency=afterok:{arr}",
                              "--kill-on-invalid-dep=yes", "-o", f"{tmp}/agg.out", "--wrap",
                              "true"], capture_output=True, text=True, check=True).stdout.strip()
        while subprocess.run(["squeue", "-h", "-j", f"{arr},{agg}"], capture_output=True,
                             text=True).stdout.strip():
            time.sleep(0.1)
        dt = time.perf_counter() - t0
        done = len(list(Path(tmp).glob("*.out")))
    print(f"slurm: array of {tasks} no-op tasks + aggregation job: {dt:.1f} s wall "
          f"({done} logs)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--slurm-tasks", type=int, default=8)
    args = ap.parse_args()
    bench_grading(args.workers, args.rows)
    bench_slurm(args.slurm_tasks)


if __name__ == "__main__":
    main()
