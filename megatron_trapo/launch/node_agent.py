"""Runs the inference servers of one node (one Slurm step per server node) and stops them.

``python -m megatron_trapo.launch.node_agent --plan RUN/launch/plan.json --host NODE`` starts
every server the plan puts on NODE, each with its own ``CUDA_VISIBLE_DEVICES`` and log file,
and waits. A server that dies is reported and the others keep serving (the trainer drops it
from its pool). SIGTERM/SIGINT (``scancel``, the launcher's teardown) stops them all: SIGTERM
to each server's process group, SIGKILL after a grace period.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

GRACE_S = 20.0


def stop(procs: Iterable[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM each process's group (each was started in a session of its own), SIGKILL the
    ones still running after ``grace_s``. The launcher stops its steps the same way."""
    procs = list(procs)
    for p in procs:
        _signal(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="the plan.json the launcher wrote")
    ap.add_argument("--host", required=True, help="this node's name in the plan")
    args = ap.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    mine = [s for s in plan["placement"]["servers"] if s["host"] == args.host]
    if not mine:
        print(f"node_agent: the plan puts no server on {args.host}", file=sys.stderr)
        return 2
    log_dir = Path(plan["log_dir"]) / "servers"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: Dict[str, subprocess.Popen] = {}
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for s in mine:
        cmd = plan["commands"]["servers"][s["name"]]
        log = open(log_dir / f"{s['name']}.log", "w")
        procs[s["name"]] = subprocess.Popen(cmd["argv"], env={**os.environ, **cmd["env"]},
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        print(f"node_agent {args.host}: {s['name']} pid {procs[s['name']].pid} on GPUs "
              f"{cmd['env'].get('CUDA_VISIBLE_DEVICES', '')} → {s['url']}", flush=True)
    reported = set()
    while not stopping:
        for name, p in procs.items():
            if p.poll() is not None and name not in reported:
                reported.add(name)
                print(f"node_agent {args.host}: {name} exited with code {p.returncode} "
                      f"(log: {log_dir / (name + '.log')})", flush=True)
        if len(reported) == len(procs):
            return 1  # every server of this node is gone
        time.sleep(0.5)
    stop(procs.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
