"""``megatron-trapo launch``: one command runs a whole job — inference servers on their nodes,
then the trainer, then everything stopped again.

Inside a Slurm allocation (``sbatch examples/run_trapo_32b.sh``) every role is a job step
(``srun --overlap``): one server-agent step per server node (it starts that node's servers with
explicit GPU ids), then the trainer's torchrun step over the trainer nodes. Outside Slurm the
same roles run as local processes on this machine (one node only). The launcher waits until
every server answers ``/health_generate``, runs the trainer, and on exit, failure, SIGTERM
(``scancel``) or Ctrl-C stops the servers. ``--dry-run`` prints the placement and every
command line and starts nothing.

Files (under ``log_dir/launch``, which must be on a filesystem every node sees): ``plan.json``
(placement + commands, read by the agents), ``job.json`` (state, server URLs, exit code),
``servers/<name>.log`` and ``agent-<host>.log``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import httpx

from megatron_trapo.config import ConfigError, TrainConfig
from megatron_trapo.launch import commands as C
from megatron_trapo.launch.hosts import in_slurm, job_hosts
from megatron_trapo.launch.node_agent import stop
from megatron_trapo.launch.placement import Placement, place
from megatron_trapo.platform.distributed import validate_layout
from megatron_trapo.train.preemption import PREEMPTED_EXIT, read_record, request_stop, stop_file

STOP_GRACE_S = 40.0  # the agents' own grace (20 s) plus srun's signal forwarding


@dataclass
class Job:
    cfg: TrainConfig
    placement: Placement
    commands: Dict
    log_dir: Path
    slurm: bool
    run_id: str

    @property
    def hosts(self) -> List[str]:
        return list(dict.fromkeys([*self.placement.trainer.hosts, *self.placement.server_hosts]))

    @property
    def plan_path(self) -> Path:
        return self.log_dir / "plan.json"

    def describe(self) -> str:
        """The dry run's text: roles, then every command line in the order they start."""
        p, t = self.placement, self.placement.trainer
        lines = [f"placement: {p.mode}; trainer {len(t.hosts)} node(s) × {len(t.gpus)} GPU(s) "
                 f"= world {t.world_size} (tp={self.cfg.parallel.tensor_model_parallel_size} "
                 f"pp={self.cfg.parallel.pipeline_model_parallel_size} "
                 f"cp={self.cfg.parallel.context_parallel_size}); "
                 f"{len(p.servers)} server(s) of TP {self.cfg.launch.server_tp_size}",
                 f"  trainer: {','.join(t.hosts)} GPUs {C.gpu_list(t.gpus)} "
                 f"rendezvous {t.master_addr}:{t.master_port}"]
        lines += [f"  {s.name}: {s.host} GPUs {C.gpu_list(s.gpus)} → {s.url}" for s in p.servers]
        lines.append("commands:")
        for host, cmd in self.commands["agents"].items():
            lines.append(f"  [servers on {host}] {cmd.shell()}")
        for name, cmd in self.commands["servers"].items():
            lines.append(f"    [{name}] {cmd.shell()}")
        lines.append(f"  [trainer] {self.commands['trainer'].shell()}")
        return "\n".join(lines)

    def write_plan(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmds = {"agents": {h: vars(c) for h, c in self.commands["agents"].items()},
                "servers": {n: vars(c) for n, c in self.commands["servers"].items()},
                "trainer": vars(self.commands["trainer"])}
        plan = {"run_id": self.run_id, "log_dir": str(self.log_dir), "slurm": self.slurm,
                "placement": self.placement.to_dict(), "commands": cmds}
        tmp = self.plan_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=2))
        os.replace(tmp, self.plan_path)

    def status(self, **fields) -> None:
        path = self.log_dir / "job.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        state.update(fields, run_id=self.run_id, server_urls=self.placement.server_urls,
                     time=time.time())
        path.write_text(json.dumps(state, indent=2))


def build_job(cfg: TrainConfig, config_path: Optional[str], overrides: Sequence[str],
              hosts: Optional[str] = None, env: Mapping[str, str] = os.environ,
              resume: bool = False, overwrite: bool = False) -> Job:
    """Resolve hosts, roles and command lines; every error names what to change."""
    if cfg.rollout.engine != "sglang":
        raise ConfigError(f"rollout.engine={cfg.rollout.engine}: launch starts SGLang-protocol "
                          "servers (rollout.server_impl=sglang, or hf on CPU); use "
                          "`megatron-trapo train` for the HF engine")
    if not cfg.rollout.model_path:
        raise ConfigError("rollout.model_path is not set: the HF folder every inference server "
                          "loads (the trainer then syncs its own weights at step 0)")
    slurm = in_slurm(env)
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if slurm and restarts > 0:  # a requeued job (preempted, or the node failed): continue it
        print(f"launch: Slurm restart {restarts} of job {env.get('SLURM_JOB_ID')}: resuming "
              f"from {cfg.checkpoint.save}", flush=True)
        resume, overwrite = True, False
    if slurm and not cfg.checkpoint.save:
        print("launch: warning: checkpoint.save is not set, so a preempted or timed-out job "
              "cannot save its work", flush=True)
    placement = place(job_hosts(env, hosts), cfg.launch)
    validate_layout(cfg.parallel, placement.trainer.world_size,
                    None if cfg.load else cfg.model)
    run_id = env.get("SLURM_JOB_ID") or uuid.uuid4().hex[:8]
    log_dir = Path(cfg.log_dir or "runs/train").resolve() / "launch"
    cmds = C.job_commands(placement, cfg.rollout, cfg.launch, str(log_dir / "plan.json"),
                          config_path, overrides, run_id, slurm, resume, overwrite)
    return Job(cfg, placement, cmds, log_dir, slurm, run_id)


def _local_only(job: Job) -> None:
    hosts = set(job.placement.trainer.hosts) | set(job.placement.server_hosts)
    if not job.slurm and len(hosts) > 1:
        raise ConfigError(f"{len(hosts)} hosts outside a Slurm allocation: run inside one "
                          "(sbatch / salloc), or start the --dry-run commands on each host")


def _start(cmd: C.Command, log: Optional[Path]) -> subprocess.Popen:
    out = open(log, "w") if log is not None else None
    return subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=out,
                            stderr=subprocess.STDOUT if out else None, start_new_session=True)


def _wait_servers(job: Job, agents: Dict[str, subprocess.Popen], timeout_s: float) -> None:
    pending = {s.url: s for s in job.placement.servers}
    deadline = time.time() + timeout_s
    while pending:
        for host, proc in agents.items():
            if proc.poll() is not None:
                log = job.log_dir / f"agent-{host}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise RuntimeError(f"the servers of {host} exited (code {proc.returncode}) "
                                   f"before becoming healthy; {log}:\n{tail}\nserver logs: "
                                   f"{job.log_dir / 'servers'}")
        for url in list(pending):
            try:
                if httpx.get(url + "/health_generate", timeout=10).status_code == 200:
                    del pending[url]
            except httpx.HTTPError:
                pass
        if pending and time.time() > deadline:
            raise RuntimeError(f"servers {sorted(pending)} not healthy after {timeout_s:.0f} s; "
                               f"logs: {job.log_dir / 'servers'}")
        time.sleep(1.0)


def run_job(job: Job) -> int:
    """Start the servers, wait for them, run the trainer, stop everything; the trainer's exit
    code (or 1 when the servers never came up, 128+N on signal N).

    SIGUSR1 or SIGTERM while the trainer runs (``sbatch --signal=B:USR1@…``, Slurm preemption,
    ``scancel``) asks it to stop after its current step (the stop file in ``checkpoint.save``),
    waits up to ``launch.stop_grace_s`` for its checkpoint, and returns ``PREEMPTED_EXIT``;
    inside Slurm with ``launch.requeue`` the job is then requeued, and the requeued job resumes.
    Ctrl-C, a second signal, or a signal before the trainer started stop everything at once."""
    _local_only(job)
    job.write_plan()
    agents: Dict[str, subprocess.Popen] = {}
    trainer: Optional[subprocess.Popen] = None
    received: List[int] = []
    save_dir = job.cfg.checkpoint.save
    stop_deadline: Optional[float] = None  # set by the first graceful signal
    t_start = time.time()

    def on_signal(signum, frame):
        nonlocal stop_deadline
        received.append(signum)
        graceful = (signum in (signal.SIGTERM, signal.SIGUSR1) and trainer is not None
                    and save_dir and stop_deadline is None)
        if not graceful:
            raise KeyboardInterrupt
        request_stop(save_dir, signal.Signals(signum).name)
        stop_deadline = time.time() + job.cfg.launch.stop_grace_s
        print(f"launch: got {signal.Signals(signum).name}: the trainer stops after its current "
              f"step and saves (waiting up to {job.cfg.launch.stop_grace_s:.0f} s)", flush=True)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    old = {s: signal.signal(s, on_signal) for s in handled}
    code = 1
    try:
        job.status(state="starting servers")
        for host, cmd in job.commands["agents"].items():
            agents[host] = _start(cmd, job.log_dir / f"agent-{host}.log")
        t0 = time.time()
        _wait_servers(job, agents, job.cfg.rollout.startup_timeout_s)
        print(f"launch: {len(job.placement.servers)} server(s) healthy after "
              f"{time.time() - t0:.0f} s: {', '.join(job.placement.server_urls)}", flush=True)
        job.status(state="training")
        stale = stop_file(save_dir)
        if stale is not None and stale.exists():  # left by an earlier job that was killed
            stale.unlink()
        trainer = _start(job.commands["trainer"], None)
        while True:
            try:
                code = trainer.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop_deadline is not None and time.time() > stop_deadline:
                    print("launch: the trainer did not stop within launch.stop_grace_s",
                          flush=True)
                    raise KeyboardInterrupt
        if code < 0:  # killed by a signal (e.g. the OOM killer's SIGKILL): report it as a shell does
            code = 128 - code
        record = read_record(save_dir)
        if stop_deadline is not None and record and record.get("time", 0) >= t_start:
            print(f"launch: the trainer stopped at step {record['step']} ({record['reason']})"
                  + (", checkpoint saved" if record.get("saved") else ""), flush=True)
            code = PREEMPTED_EXIT
    except KeyboardInterrupt:
        code = 128 + (received[-1] if received else signal.SIGINT)
    except RuntimeError as exc:
        print(f"launch: {exc}", flush=True)
        code = 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if trainer is not None:
            stop([trainer], STOP_GRACE_S)
        stop(agents.values(), STOP_GRACE_S)
        job.status(state="preempted" if code == PREEMPTED_EXIT else "done", exit_code=code)
        print(f"launch: done (exit code {code}); servers stopped", flush=True)
    if code == PREEMPTED_EXIT and job.slurm and job.cfg.launch.requeue:
        requeue(job)
    return code


def requeue(job: Job) -> None:
    """Put this Slurm job back in the queue; it restarts the batch script, which resumes
    (``SLURM_RESTART_COUNT`` ≥ 1). Needs ``#SBATCH --requeue`` on clusters where
    ``JobRequeue=0``."""
    job_id = os.environ.get("SLURM_JOB_ID")
    print(f"launch: requeueing Slurm job {job_id}", flush=True)
    r = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"launch: scontrol requeue {job_id} failed: {r.stderr.strip()} — resubmit with "
              "--resume", flush=True)
