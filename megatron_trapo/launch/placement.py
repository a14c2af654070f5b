"""Hosts → roles: which nodes (and GPUs) train, which serve rollouts, on which ports.

Two shapes, both with explicit GPU ids (one inference server per ``server_tp_size`` GPUs):

* **disaggregated** (two or more nodes): the first ``launch.trainer_nodes`` hosts train on
  all (or ``trainer_gpus_per_node``) of their GPUs; every other host runs
  ``gpus_per_node / server_tp_size`` servers on GPUs ``0..tp-1``, ``tp..2tp-1``, …
* **split-node** (one node): GPUs ``0..k-1`` train (``k = trainer_gpus_per_node``), the rest
  serve — the paper's 7B setting, 4 trainer GPUs + 4 single-GPU servers on one 8-GPU node.

Pure data: no process is started here, so every layout is unit-tested.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

from megatron_trapo.config import ConfigError, LaunchConfig


@dataclass(frozen=True)
class ServerSlot:
    """One inference server: its host, its GPUs (ids on that host), its port, its TP size."""

    name: str
    host: str
    gpus: Tuple[int, ...]
    port: int

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class TrainerPart:
    """The torchrun job: its hosts (in node-rank order), the GPU ids it uses on each, and
    the rendezvous endpoint on its first host."""

    hosts: Tuple[str, ...]
    gpus: Tuple[int, ...]
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return len(self.hosts) * len(self.gpus)


@dataclass(frozen=True)
class Placement:
    mode: str  # disaggregated | split-node
    trainer: TrainerPart
    servers: Tuple[ServerSlot, ...]

    @property
    def server_hosts(self) -> List[str]:
        return list(dict.fromkeys(s.host for s in self.servers))

    def servers_on(self, host: str) -> List[ServerSlot]:
        return [s for s in self.servers if s.host == host]

    @property
    def server_urls(self) -> List[str]:
        return [s.url for s in self.servers]

    def to_dict(self) -> Dict:
        return {"mode": self.mode, "trainer": asdict(self.trainer),
                "servers": [asdict(s) | {"url": s.url} for s in self.servers]}

    @classmethod
    def from_dict(cls, d: Dict) -> "Placement":
        t = d["trainer"]
        trainer = TrainerPart(tuple(t["hosts"]), tuple(t["gpus"]), t["master_addr"],
                              int(t["master_port"]))
        servers = tuple(ServerSlot(s["name"], s["host"], tuple(s["gpus"]), int(s["port"]))
                        for s in d["servers"])
        return cls(d["mode"], trainer, servers)


def _servers(hosts: Sequence[str], gpu_ids: Sequence[int], cfg: LaunchConfig,
             first_index: int = 0) -> List[ServerSlot]:
    tp = cfg.server_tp_size
    slots = []
    for host in hosts:
        for k in range(len(gpu_ids) // tp):
            slots.append(ServerSlot(f"server{first_index + len(slots)}", host,
                                    tuple(gpu_ids[k * tp:(k + 1) * tp]), cfg.server_port + k))
    return slots


def place(hosts: Sequence[str], cfg: LaunchConfig) -> Placement:
    """The roles of ``hosts`` under ``cfg``; a layout that leaves no GPU for one of the two
    roles, or GPUs that no server can use, is an error naming the field to change."""
    hosts = list(hosts)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"hosts {hosts} name a host twice")
    gpus = list(range(cfg.gpus_per_node))
    tp = cfg.server_tp_size
    if len(hosts) == 1:
        k = cfg.trainer_gpus_per_node
        if k is None or k >= cfg.gpus_per_node:
            raise ConfigError(
                f"one node ({hosts[0]}): set launch.trainer_gpus_per_node below "
                f"launch.gpus_per_node={cfg.gpus_per_node} to leave GPUs for the inference "
                "servers (e.g. 4 of 8), or run on two or more nodes")
        if cfg.trainer_nodes != 1:
            raise ConfigError(f"launch.trainer_nodes={cfg.trainer_nodes} but the job has one node")
        rest = gpus[k:]
        if len(rest) % tp:
            raise ConfigError(f"{len(rest)} GPUs left for servers on {hosts[0]} is not a "
                              f"multiple of launch.server_tp_size={tp}")
        trainer = TrainerPart((hosts[0],), tuple(gpus[:k]), hosts[0], cfg.master_port)
        return Placement("split-node", trainer, tuple(_servers(hosts, rest, cfg)))
    if cfg.trainer_nodes >= len(hosts):
        raise ConfigError(f"launch.trainer_nodes={cfg.trainer_nodes} leaves none of the "
                          f"{len(hosts)} nodes for inference servers")
    k = cfg.trainer_gpus_per_node or cfg.gpus_per_node
    train_hosts = hosts[:cfg.trainer_nodes]
    trainer = TrainerPart(tuple(train_hosts), tuple(gpus[:k]), train_hosts[0], cfg.master_port)
    return Placement("disaggregated", trainer,
                     tuple(_servers(hosts[cfg.trainer_nodes:], gpus, cfg)))
