"""The exact command lines of a job: inference servers, the per-node server agent, the trainer's
torchrun, and the ``srun`` steps that carry them to their nodes.

Every function returns a :class:`Command` (argv + the environment it adds), so a dry run
prints exactly what a real run executes, and tests compare them word for word.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_trapo.config import LaunchConfig, RolloutConfig
from megatron_trapo.launch.placement import Placement, ServerSlot, TrainerPart
from megatron_trapo.rollout.servers import server_command

# Environment every trainer rank gets: megatron's TP/SP overlap wants one hardware queue;
# expandable segments cut fragmentation on the tight first pipeline stage; NVLS off (its
# buffers cost GPU memory and some clusters' NVSwitch firmware mishandles it).
TRAINER_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1",
               "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
               "NCCL_NVLS_ENABLE": "0"}
# Raw logprobs (before temperature) from SGLang: see rollout/types.py.
SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}


@dataclass(frozen=True)
class Command:
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """One line a user can paste: ``VAR=… VAR=… argv…``."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(assigns + [shlex.quote(a) for a in self.argv])


def gpu_list(gpus: Sequence[int]) -> str:
    return ",".join(str(g) for g in gpus)


def server(slot: ServerSlot, rollout: RolloutConfig, launch: LaunchConfig,
           python: str = sys.executable) -> Command:
    """One inference server on its GPUs, reachable from the other nodes (``--host 0.0.0.0``).
    ``rollout.server_impl``: real SGLang, or our protocol server standing in for it on CPU."""
    if not rollout.model_path:
        raise ValueError("rollout.model_path (the HF folder the servers load) is not set")
    extra = ["--tp-size", str(slot.tp)]
    if rollout.server_impl == "sglang":
        extra += ["--mem-fraction-static", str(launch.server_mem_fraction)]
        if launch.server_context_length:
            extra += ["--context-length", str(launch.server_context_length)]
    argv = server_command(rollout.server_impl, rollout.model_path, slot.port, host="0.0.0.0",
                          tokenizer_path=rollout.tokenizer_path,
                          extra=extra + list(rollout.server_args))
    argv[0] = python
    return Command(argv, {"CUDA_VISIBLE_DEVICES": gpu_list(slot.gpus), **SERVER_ENV})


def node_agent(plan_path: str, host: str, python: str = sys.executable) -> Command:
    """The process that runs (and on SIGTERM stops) every server of one node."""
    return Command([python, "-m", "megatron_trapo.launch.node_agent", "--plan", plan_path,
                    "--host", host])


def trainer(part: TrainerPart, config_path: Optional[str], overrides: Sequence[str],
            server_urls: Sequence[str], run_id: str, resume: bool = False,
            split_node: bool = False, python: str = sys.executable,
            overwrite: bool = False) -> Command:
    """torchrun over the trainer's hosts with c10d rendezvous on its first host: node ranks
    come from the rendezvous, not from job-wide Slurm variables."""
    argv = [python, "-m", "torch.distributed.run", "--nnodes", str(len(part.hosts)),
            "--nproc-per-node", str(len(part.gpus)), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{part.master_addr}:{part.master_port}", "--rdzv-id", run_id,
            "-m", "megatron_trapo.cli", "train"]
    if config_path:
        argv += ["--config", config_path]
    if resume:
        argv.append("--resume")
    if overwrite:
        argv.append("--overwrite")
    argv += list(overrides)
    argv += ["rollout.engine=sglang", f"rollout.server_urls={json.dumps(list(server_urls))}",
             "rollout.use_router=true"]
    env = dict(TRAINER_ENV)
    if split_node:  # the servers hold the other GPUs of this node
        env["CUDA_VISIBLE_DEVICES"] = gpu_list(part.gpus)
    return Command(argv, env)


def srun(hosts: Sequence[str], inner: Command, launch: LaunchConfig, name: str) -> Command:
    """``inner`` as a Slurm job step on ``hosts``, one task per node. Every step asks for all
    of its nodes' GPUs and may overlap the others (the split-node layout runs the trainer and
    the servers on one node; each process then picks its GPUs by id)."""
    argv = ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1",
            f"--nodelist={','.join(hosts)}", "--overlap", "--kill-on-bad-exit=1",
            f"--job-name={name}", "--export=ALL"]
    if launch.slurm_gres:
        argv.append(f"--gres=gpu:{launch.gpus_per_node}")
    if launch.container_image:
        argv.append(f"--container-image={launch.container_image}")
        if launch.container_mounts:
            argv.append(f"--container-mounts={launch.container_mounts}")
        argv.append(f"--container-workdir={os.getcwd()}")
    argv += list(launch.srun_args)
    # the step's own variables are set inside the task (`env K=V …`): Slurm sets
    # CUDA_VISIBLE_DEVICES for a GPU step after it copied the submitting environment
    assigns = ["env", *[f"{k}={v}" for k, v in inner.env.items()]] if inner.env else []
    return Command(argv + assigns + inner.argv)


def job_commands(placement: Placement, rollout: RolloutConfig, launch: LaunchConfig,
                 plan_path: str, config_path: Optional[str], overrides: Sequence[str],
                 run_id: str, slurm: bool, resume: bool = False, overwrite: bool = False,
                 python: Optional[str] = None) -> Dict[str, object]:
    """Everything the job runs: one server-agent step per server node, the servers each agent
    starts, then the trainer step. ``python``: the interpreter on the nodes (default: this one,
    or the container's ``python`` with ``launch.container_image``)."""
    python = python or ("python" if launch.container_image else sys.executable)
    agents = {}
    for host in placement.server_hosts:
        inner = node_agent(plan_path, host, python)
        agents[host] = srun([host], inner, launch, f"trapo-servers-{host}") if slurm else inner
    servers = {s.name: server(s, rollout, launch, python) for s in placement.servers}
    train = trainer(placement.trainer, config_path, overrides, placement.server_urls, run_id,
                    resume, placement.mode == "split-node", python, overwrite)
    if slurm:
        train = srun(list(placement.trainer.hosts), train, launch, "trapo-train")
    return {"agents": agents, "servers": servers, "trainer": train}
