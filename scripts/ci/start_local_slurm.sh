#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm evaluation tests (CI and developers).
# Installs Debian's munge + slurmctld + slurmd + slurm-client when missing, writes a minimal
# slurm.conf under $SLURM_LOCAL_DIR and starts the daemons by hand (no systemd). Prints, and
# writes to $SLURM_LOCAL_DIR/env.sh, the one variable clients need: SLURM_CONF.
# Stop with scripts/ci/stop_local_slurm.sh (it stops only what this script started).
#
#   source <(bash scripts/ci/start_local_slurm.sh)     # or: eval "$(bash ... )"
#
# Knobs: SLURM_LOCAL_DIR (default /tmp/megatron_trapo_slurm), SLURM_LOCAL_CPUS (CPUs the node
# advertises, default 4: more than the machine has lets more array tasks run at once).
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/megatron_trapo_slurm}
CPUS=${SLURM_LOCAL_CPUS:-4}
log() { echo "start_local_slurm: $*" >&2; }

if [ "$(id -u)" != 0 ]; then log "must run as root (installs packages, runs munged as munge)"; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing munge slurmctld slurmd slurm-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >&2
fi
mkdir -p "$DIR"/{state,spool,log}

# munge: the key is made by the package; the socket dir must exist and belong to munge.
if [ ! -S /run/munge/munge.socket.2 ] || ! munge -n </dev/null >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key \
    && chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/started_munged"
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
fi

HOST=$(hostname -s)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
CONF="$DIR/slurm.conf"
cat > "$CONF" <<CONF
ClusterName=trapo-local
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
MinJobAge=300
NodeName=$HOST CPUs=$CPUS RealMemory=${MEM:-1024} State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"

if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
  log "slurmctld already running (pid $(cat "$DIR/slurmctld.pid")); reconfiguring"
  scontrol reconfigure >&2 || true
else
  slurmctld -f "$CONF" -i   # -i: ignore stale state from an earlier run
fi
if ! { [ -f "$DIR/slurmd.pid" ] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null; }; then
  slurmd -f "$CONF"
fi
for _ in $(seq 100); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then break; fi
  sleep 0.2
done
if ! sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  log "the node did not come up; logs under $DIR/log"; tail -5 "$DIR"/log/*.log >&2; exit 1
fi
echo "export SLURM_CONF=$CONF" | tee "$DIR/env.sh"
log "up: $(sinfo -h -o '%P %D %t %c CPUs')"
