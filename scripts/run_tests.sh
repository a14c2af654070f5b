#!/usr/bin/env bash
# The test suite, as CI runs it: pytest over tests/, with a local one-node Slurm cluster for the
# Slurm evaluation tests (started here when none is reachable and this is root; stopped after).
# Without a cluster those tests skip, unless MEGATRON_TRAPO_REQUIRE_SLURM=1 (CI) makes that fail.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! sinfo -h >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    env_line=$(bash scripts/ci/start_local_slurm.sh)
    eval "$env_line"
    trap 'bash scripts/ci/stop_local_slurm.sh' EXIT
  else
    echo "run_tests: no Slurm cluster and not root: the Slurm tests will skip" >&2
  fi
fi
.venv/bin/python -m pytest -q tests "$@"
