"""The weight-update group forms with SGLang's own ``init_custom_process_group`` (from the
sglang wheel, on gloo) on the other side, and a broadcast arrives bit-exact; the project's
former helper (fixed store prefix) does not form a group with it at all."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import WORKERS, free_port
from workers.results import GroupPeer, from_json

PEER = WORKERS / "weight_group_peer.py"


def run_group(roles, tmp_path, timeout_s=60.0):
    """Start one process per rank; a rank still waiting after the deadline is killed and
    reported as formed=False, error="hung"."""
    port = free_port()
    procs, outs = [], []
    # as under torchrun, whose agent-store setting once made the trainer's rank 0 a client of
    # a store nobody hosted
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True")
    for rank, role in enumerate(roles):
        out = tmp_path / f"{role}-{rank}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, str(PEER), role, str(rank), str(len(roles)), str(port),
             "weight_update_group", str(out), str(timeout_s)], cwd=WORKERS, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for rank, (role, proc, out) in enumerate(zip(roles, procs, outs)):
        try:
            log = proc.communicate(timeout=timeout_s + 5)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results.append(GroupPeer(role=role, rank=rank, formed=False, error="hung"))
            continue
        assert out.exists(), log[-2000:]
        results.append(from_json(GroupPeer, out.read_text()))
    return results


def setup_module():
    import importlib.util

    assert importlib.util.find_spec("sglang") is not None, (
        "the sglang wheel is needed (scripts/setup.sh installs it with --no-deps)")


@pytest.mark.parametrize("engine_ranks", [1, 2])
def test_group_with_sglang_function_broadcasts_bit_exact(tmp_path, engine_ranks):
    results = run_group(["ours"] + ["sglang"] * engine_ranks, tmp_path)
    assert all(r.formed for r in results), results
    assert all(Path(r.source).name == "common.py" and "sglang" in r.source
               for r in results[1:])
    sent = torch.tensor(results[0].values)
    assert sent.abs().sum() > 0
    for r in results[1:]:
        assert torch.equal(torch.tensor(r.values), sent)  # bit-exact (bf16 → fp32 on both)


def test_former_stateless_helper_cannot_meet_sglang(tmp_path):
    results = run_group(["stateless", "sglang"], tmp_path, timeout_s=5.0)
    assert not all(r.formed for r in results)  # the keys differ: it times out
