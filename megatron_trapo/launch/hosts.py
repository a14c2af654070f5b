"""The hosts of a job: Slurm's node lists expanded, or hosts given by the user.

On a cluster ``scontrol show hostnames`` expands Slurm's hostlist syntax and is used. Dry runs
also happen where Slurm's client is missing or has no configuration (a laptop, CI, a login
node of another cluster), so :func:`expand_nodelist` parses the syntax itself there; the
Slurm tests check it against ``scontrol``.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from typing import Dict, List, Mapping, Optional

from megatron_trapo.config import ConfigError

_BRACKET = re.compile(r"\[([^\]]*)\]")


def _split_top_level(spec: str) -> List[str]:
    """Split on commas outside brackets: ``a[1,2],b`` → ``["a[1,2]", "b"]``."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"node list {spec!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ConfigError(f"node list {spec!r}: unbalanced '['")
    return parts + [cur]


def _range_values(body: str, spec: str) -> List[str]:
    values = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"node list {spec!r}: bad range {item!r}")
            width = len(lo)  # zero padding as written: gpu[01-03] → gpu01 …
            values += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            values.append(item)
        else:
            raise ConfigError(f"node list {spec!r}: bad item {item!r}")
    return values


def expand_nodelist(spec: str) -> List[str]:
    """``gpu[01-03,07],login5,a[1-2]b[3-4]`` → ``gpu01 gpu02 gpu03 gpu07 login5 a1b3 a1b4
    a2b3 a2b4`` (the order ``scontrol show hostnames`` gives)."""
    hosts: List[str] = []
    for part in _split_top_level(spec.strip()):
        if not part:
            continue
        pieces = _BRACKET.split(part)  # literal, range body, literal, range body, …
        choices = [[p] if i % 2 == 0 else _range_values(p, spec) for i, p in enumerate(pieces)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def scontrol_hostnames(spec: str) -> Optional[List[str]]:
    """Slurm's own expansion, or None where ``scontrol`` is missing or cannot run."""
    if not shutil.which("scontrol"):
        return None
    try:
        res = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.split() if res.returncode == 0 else None


def job_hosts(env: Mapping[str, str] = os.environ, hosts: Optional[str] = None) -> List[str]:
    """The hosts this job may use: ``hosts`` (comma-separated, given by the user), else the
    Slurm allocation's (``SLURM_JOB_NODELIST``; the batch step's own ``SLURM_NODELIST`` is the
    same list), else this machine alone."""
    if hosts:
        return [h for h in (x.strip() for x in hosts.split(",")) if h]
    spec = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not spec:
        return ["localhost"]
    expanded = scontrol_hostnames(spec) or expand_nodelist(spec)
    nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if nnodes and int(nnodes) != len(expanded):
        raise ConfigError(f"SLURM_JOB_NODELIST={spec!r} expands to {len(expanded)} hosts but "
                          f"SLURM_JOB_NUM_NODES={nnodes}")
    return expanded


def in_slurm(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def slurm_env_summary(env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
            "SLURM_STEP_NODELIST", "SLURM_SUBMIT_DIR")
    return {k: env[k] for k in keys if k in env}
