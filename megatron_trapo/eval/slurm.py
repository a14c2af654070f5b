"""Evaluation as Slurm job arrays: one array task per shard (``sbatch --array=…%M``), then an
aggregation job that runs only if every task succeeded (``--dependency=afterok:<array>``,
``--kill-on-invalid-dep=yes``: a failed task cancels it instead of leaving it pending
forever). A Megatron checkpoint is converted by a first job the array depends on.

Plain ``sbatch`` through subprocess rather than submitit: without Slurm accounting (slurmdbd)
submitit waits forever on a task killed before writing its result; here the state lives in the
output folder (a shard's file exists or not), which needs no accounting and lets a failed shard
be resubmitted alone (:func:`resubmit`)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_trapo.config import ConfigError, SlurmConfig
from megatron_trapo.eval.shards import read_jsonl, write_atomic


class SlurmError(RuntimeError):
    """sbatch/squeue failed; the message carries Slurm's own words."""


def array_spec(indices: Sequence[int], max_concurrent: int) -> str:
    """``--array`` value: ranges compressed (``0-3,7,9-10``) and the ``%M`` throttle."""
    idx = sorted(set(indices))
    if not idx:
        raise ValueError("no array indices")
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return f"{','.join(parts)}%{max_concurrent}"


def script(cfg: SlurmConfig, job_name: str, log: Path, command: str, gpus: int) -> str:
    """An sbatch script: the #SBATCH options of ``cfg``, its setup lines, then ``command``."""
    opts = [f"--job-name={job_name}", f"--output={log}", "--ntasks=1", "--nodes=1",
            f"--cpus-per-task={cfg.cpus_per_task}", f"--time={cfg.time}", "--export=ALL"]
    opts += [f"--{k}={v}" for k, v in (("partition", cfg.partition), ("account", cfg.account),
                                        ("qos", cfg.qos), ("mem", cfg.mem)) if v]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    opts += list(cfg.extra_sbatch_args)
    if cfg.container_image:  # pyxis: the command runs as a step inside the image
        flags = [f"--container-image={shlex.quote(cfg.container_image)}",
                 f"--container-workdir={shlex.quote(os.getcwd())}"]
        if cfg.container_mounts:
            flags.append(f"--container-mounts={shlex.quote(cfg.container_mounts)}")
        inner = command[len("exec "):] if command.startswith("exec ") else command
        command = f"exec srun --ntasks=1 {' '.join(flags)} {inner}"
    lines = ["#!/bin/bash", *[f"#SBATCH {o}" for o in opts], "set -euo pipefail",
             'echo "host $(hostname) job ${SLURM_JOB_ID:-} task ${SLURM_ARRAY_TASK_ID:-}"',
             *cfg.setup, command]
    return "\n".join(lines) + "\n"


def sbatch(args: List[str], path: Path) -> str:
    """Submit ``path``; returns the job id."""
    cmd = ["sbatch", "--parsable", *args, str(path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: is this a Slurm login node? "
                         "(for a local test cluster: scripts/ci/start_local_slurm.sh)") from None
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(map(shlex.quote, cmd))} failed: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def queued(job_ids: Sequence[str]) -> List[str]:
    """Those of ``job_ids`` (array tasks included) still pending or running."""
    if not job_ids:
        return []
    res = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:  # squeue errors for ids it has forgotten: they are all done
        if "Invalid job id" in res.stderr:
            return []
        raise SlurmError(f"squeue failed: {res.stderr.strip()}")
    return res.stdout.split()


def wait(job_ids: Sequence[str], poll_s: float, timeout_s: Optional[float] = None) -> None:
    deadline = None if timeout_s is None else time.time() + timeout_s
    while queued(job_ids):
        if deadline is not None and time.time() > deadline:
            raise SlurmError(f"jobs {list(job_ids)} still queued after {timeout_s} s")
        time.sleep(poll_s)


def _python(cfg: SlurmConfig) -> str:
    # in a container, its own interpreter (this machine's path need not exist there)
    return cfg.python or ("python" if cfg.container_image else sys.executable)


def submit(plan, indices: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """Submit the array over ``indices`` (default: every shard without results) and the
    aggregation job; a conversion job first when the model is a Megatron checkpoint that has
    not been converted. Returns the job ids (also appended to ``slurm/jobs.jsonl``)."""
    from megatron_trapo.eval.runner import hf_model_dir, missing_shards

    cfg, out = plan.cfg.slurm, plan.out_dir
    if indices is None:
        indices = [s.index for s in missing_shards(plan)]
    sdir = out / "slurm"
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    py, outq = shlex.quote(_python(cfg)), shlex.quote(str(out))
    cli = f"{py} -m megatron_trapo.cli"
    if indices:  # a summary of earlier, incomplete work must not outlive this submission
        for stale in ("summary.json", "summary.md"):
            (out / stale).unlink(missing_ok=True)
    jobs: Dict[str, str] = {}
    dep: List[str] = []
    if plan.cfg.load and not (hf_model_dir(plan) / "config.json").is_file():
        conv = sdir / "convert.sbatch"
        write_atomic(conv, script(cfg, f"{cfg.job_name}-convert", sdir / "logs" / "convert_%j.out",
                                  f"exec {cli} eval-convert {outq}", 0))
        jobs["convert"] = sbatch([], conv)
        dep = [f"--dependency=afterok:{jobs['convert']}", "--kill-on-invalid-dep=yes"]
    agg = sdir / "aggregate.sbatch"
    write_atomic(agg, script(cfg, f"{cfg.job_name}-aggregate", sdir / "logs" / "aggregate_%j.out",
                             f"exec {cli} eval-aggregate {outq}", 0))
    if indices:
        arr = sdir / "array.sbatch"
        write_atomic(arr, script(cfg, cfg.job_name, sdir / "logs" / "shard_%a_%A.out",
                                 f'exec {cli} eval-shard {outq} "$SLURM_ARRAY_TASK_ID"',
                                 cfg.gpus_per_task))
        jobs["array"] = sbatch([f"--array={array_spec(indices, cfg.max_concurrent)}", *dep], arr)
        dep = [f"--dependency=afterok:{jobs['array']}", "--kill-on-invalid-dep=yes"]
    jobs["aggregate"] = sbatch(dep, agg)
    with open(sdir / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "shards": list(indices), **jobs}) + "\n")
    return jobs


def submitted_jobs(out_dir: Path) -> List[str]:
    path = Path(out_dir) / "slurm" / "jobs.jsonl"
    if not path.is_file():
        return []
    return [v for r in read_jsonl(path) for k, v in r.items() if k in ("convert", "array", "aggregate")]


def resubmit(out_dir: str | Path) -> Dict[str, str]:
    """Resubmit only the shards without results, and a new aggregation job. Refused while an
    earlier job of this evaluation is still queued (it could still write those shards)."""
    from megatron_trapo.eval.runner import load_plan, missing_shards

    plan = load_plan(out_dir)
    busy = queued(submitted_jobs(plan.out_dir))
    if busy:
        raise ConfigError(f"jobs of this evaluation are still queued or running: {busy}; "
                          "wait for them (or scancel them) before resubmitting")
    missing = missing_shards(plan)
    if not missing and (plan.out_dir / "summary.json").is_file():
        raise ConfigError(f"{plan.out_dir} is complete: nothing to resubmit")
    return submit(plan, [s.index for s in missing])
