"""The Slurm tests' precondition: a reachable cluster (scripts/ci/start_local_slurm.sh). CI
sets MEGATRON_TRAPO_REQUIRE_SLURM=1, so that there these tests fail instead of skipping."""
import os
import subprocess

import pytest


def require_slurm() -> None:
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                            timeout=30)
        ok = up.returncode == 0 and any(s in up.stdout for s in ("idle", "mix", "alloc"))
    except FileNotFoundError:
        ok = False
    if not ok:
        msg = "no Slurm cluster (start one: source <(bash scripts/ci/start_local_slurm.sh))"
        if os.environ.get("MEGATRON_TRAPO_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
