#!/usr/bin/env bash
# Stop what scripts/ci/start_local_slurm.sh started: its jobs, slurmd, slurmctld, and munged
# only if that script started it. Packages stay installed.
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/megatron_trapo_slurm}
export SLURM_CONF="$DIR/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full --user "$(id -un)" >/dev/null 2>&1
stop() {  # pid file
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
if [ -f "$DIR/started_munged" ]; then
  [ -f /run/munge/munged.pid ] && stop /run/munge/munged.pid
  rm -f "$DIR/started_munged"
fi
echo "stop_local_slurm: stopped" >&2
