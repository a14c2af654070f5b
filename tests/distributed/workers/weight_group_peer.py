"""One member of a trainer↔engine weight-update group, as its own process (ranks of a named
group must live in different processes, as SGLang's TP workers do).

    python weight_group_peer.py ROLE RANK WORLD PORT GROUP OUT [TIMEOUT_S]

ROLE: ``ours`` (megatron_trapo.rollout.process_group.init_weight_update_group), ``sglang``
(``init_custom_process_group`` loaded from the installed sglang wheel's own source file, called
as SGLang's ``init_weights_update_group`` calls it) or ``stateless`` (the project's former
helper: a TCPStore with a fixed "weights" prefix, kept here only to show the mismatch).
Rank 0 broadcasts a seeded tensor; every rank writes what it holds after the broadcast (a
results.GroupPeer).
"""
from __future__ import annotations

import ast
import datetime
import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from results import GroupPeer, to_json


def sglang_init_custom_process_group():
    """The function object from sglang/srt/utils/common.py (the wheel's file, not a copy):
    importing that module needs SGLang's full dependency set, so only this function's
    definition is compiled, with the two names it uses from its module."""
    spec = importlib.util.find_spec("sglang")
    path = Path(spec.submodule_search_locations[0]) / "srt" / "utils" / "common.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "init_custom_process_group")
    namespace = {"torch": torch, "torch_release": tuple(int(x) for x in
                                                        torch.__version__.split("+")[0]
                                                        .split(".")[:2])}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["init_custom_process_group"], str(path)


def stateless_group(address, port, rank, world, timeout_s):
    store = dist.TCPStore(address, port, world, is_master=(rank == 0),
                          timeout=datetime.timedelta(seconds=timeout_s))
    return dist.ProcessGroupGloo(dist.PrefixStore("weights", store), rank, world)


def main():
    role, rank, world, port, group_name, out = sys.argv[1:7]
    timeout_s = float(sys.argv[7]) if len(sys.argv) > 7 else 60.0
    rank, world, port = int(rank), int(world), int(port)
    result = GroupPeer(role=role, rank=rank, formed=False)
    try:
        if role == "ours":
            from megatron_trapo.rollout.process_group import init_weight_update_group

            pg = init_weight_update_group("127.0.0.1", port, rank, world, group_name, "gloo",
                                          timeout_s=timeout_s)
        elif role == "sglang":
            fn, result.source = sglang_init_custom_process_group()
            pg = fn(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world,
                    rank=rank, group_name=group_name,
                    timeout=datetime.timedelta(seconds=timeout_s))
        else:
            pg = stateless_group("127.0.0.1", port, rank, world, timeout_s)
        t = (torch.randn(64, 33, generator=torch.Generator().manual_seed(123)).to(torch.bfloat16)
             if rank == 0 else torch.zeros(64, 33, dtype=torch.bfloat16))
        if role == "stateless":
            pg.broadcast(t, 0).wait()
        else:
            dist.broadcast(t, src=0, group=pg)
        result.values = t.float().flatten().tolist()
        result.formed = True
    except Exception as exc:  # reported to the test: which side failed, and how
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    Path(out).write_text(to_json(result))


if __name__ == "__main__":
    main()
