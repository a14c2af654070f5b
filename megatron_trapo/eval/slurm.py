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
from megatron_trapo.eval.plan import hf_model_dir, load_plan, missing_shards
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


# Pending reasons that do not clear by waiting: the request exceeds what the partition, the
# account or the QOS allows, or names something that does not exist. (DependencyNeverSatisfied
# is not here: --kill-on-invalid-dep cancels those jobs, and --wait reports the failed shards.)
NEVER_CLEARS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed"}


def never_clears(reason: str) -> bool:
    return reason in NEVER_CLEARS or "PerJob" in reason  # e.g. QOSMaxCpuPerJobLimit


def _megabytes(mem: str) -> Optional[float]:
    """sbatch's --mem value in MB (``200G``, ``64000``, ``500M``, ``1T``); None if unreadable."""
    text = mem.strip().upper()
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}
    unit = text[-1] if text and text[-1] in scale else "M"
    number = text[:-1] if text and text[-1] in scale else text
    try:
        return float(number) * scale[unit]
    except ValueError:
        return None


def _gpus(gres: str) -> int:
    """GPUs in a node's sinfo %G (``gpu:8``, ``gpu:h100:4(S:0-1),nic:2``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partition_nodes(partition: Optional[str]) -> Optional[List[dict]]:
    """Each node kind of ``partition`` (default: the cluster's default partition): CPUs,
    memory (MB) and GPUs, from ``sinfo``; None when sinfo cannot be asked."""
    cmd = ["sinfo", "-h", "-o", "%P|%c|%m|%G"] + (["-p", partition] if partition else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    nodes = []
    for line in res.stdout.splitlines():
        name, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        if partition is None and not name.endswith("*"):
            continue
        cpus = cpus.rstrip("+")
        nodes.append({"partition": name.rstrip("*"), "cpus": int(cpus) if cpus.isdigit() else 0,
                      "mem_mb": _megabytes(mem.rstrip("+")) or 0, "gpus": _gpus(gres)})
    return nodes


def check_resources(cfg: SlurmConfig) -> None:
    """Refuse, before submitting, a task that no node of the partition can hold: Slurm would
    accept it and leave it pending forever (Reason=PartitionConfig)."""
    nodes = partition_nodes(cfg.partition)
    if nodes is None:
        return  # no sinfo here: sbatch will say what is wrong
    where = f"partition {cfg.partition}" if cfg.partition else "the default partition"
    if not nodes:
        raise ConfigError(f"slurm.partition={cfg.partition}: sinfo lists no such partition"
                          if cfg.partition else "sinfo lists no default partition: set "
                                                "slurm.partition")
    fits = [n for n in nodes if n["cpus"] >= cfg.cpus_per_task and n["gpus"] >= cfg.gpus_per_task]
    if cfg.mem and _megabytes(cfg.mem) is not None:
        fits = [n for n in fits if n["mem_mb"] >= _megabytes(cfg.mem)]
    if fits:
        return
    most = lambda key: max(n[key] for n in nodes)  # noqa: E731
    problems = []
    if cfg.cpus_per_task > most("cpus"):
        problems.append(f"slurm.cpus_per_task={cfg.cpus_per_task} (its nodes have at most "
                        f"{most('cpus')} CPUs)")
    if cfg.gpus_per_task > most("gpus"):
        problems.append(f"slurm.gpus_per_task={cfg.gpus_per_task} (its nodes have at most "
                        f"{most('gpus')} GPUs)")
    if cfg.mem and (_megabytes(cfg.mem) or 0) > most("mem_mb"):
        problems.append(f"slurm.mem={cfg.mem} (its nodes have at most {most('mem_mb'):.0f} MB)")
    if not problems:
        problems.append(f"slurm.cpus_per_task={cfg.cpus_per_task}, gpus_per_task="
                        f"{cfg.gpus_per_task} and mem={cfg.mem} together")
    raise ConfigError(f"no node of {where} can run a task with {'; '.join(problems)}: the jobs "
                      "would pend forever (Reason=PartitionConfig); lower the request or choose "
                      "another slurm.partition")


def pending_reasons(job_ids: Sequence[str]) -> Dict[str, str]:
    """Pending reason per job (array tasks included) of those still queued."""
    if not job_ids:
        return {}
    res = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return {}
    out = {}
    for line in res.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", "", ""])[:3]
        if state == "PENDING":
            out[job] = reason
    return out


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
    """Until none of ``job_ids`` is queued. A job pending for a reason that cannot clear
    (:data:`NEVER_CLEARS`) fails the wait at once, with the reason, and the jobs are cancelled
    (they would pend forever)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while queued(job_ids):
        stuck = {j: r for j, r in pending_reasons(job_ids).items() if never_clears(r)}
        if stuck:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)
            detail = ", ".join(f"{j} ({r})" for j, r in sorted(stuck.items()))
            raise SlurmError(f"jobs pending for a reason that cannot clear: {detail}; cancelled "
                             f"{', '.join(job_ids)}. Check the request (slurm.partition, "
                             "cpus_per_task, gpus_per_task, mem, time, account, qos) against "
                             "`sinfo` / `sacctmgr show qos`, then resubmit")
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

    cfg, out = plan.cfg.slurm, plan.out_dir
    check_resources(cfg)
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

    plan = load_plan(out_dir)
    busy = queued(submitted_jobs(plan.out_dir))
    if busy:
        raise ConfigError(f"jobs of this evaluation are still queued or running: {busy}; "
                          "wait for them (or scancel them) before resubmitting")
    missing = missing_shards(plan)
    if not missing and (plan.out_dir / "summary.json").is_file():
        raise ConfigError(f"{plan.out_dir} is complete: nothing to resubmit")
    return submit(plan, [s.index for s in missing])
