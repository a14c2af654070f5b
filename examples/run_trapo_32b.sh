#!/usr/bin/env bash
# TRAPO on Qwen2.5-32B, one command on a Slurm cluster of 8-GPU H100 nodes:
#   sbatch examples/run_trapo_32b.sh [key=value ...] [--resume]
# or `bash examples/run_trapo_32b.sh` inside an allocation (salloc), or `--dry-run` anywhere to
# print the placement and every command line. Default split of the 6 nodes: 4 trainer nodes
# (TP 8 × PP 2 × DP 2) and 2 rollout nodes with one TP-8 SGLang server each; the launcher
# starts the servers, waits for them, runs torchrun on the trainer nodes and stops everything
# on exit, failure or scancel (megatron_trapo/launch/job.py). Check the memory first:
#   megatron-trapo plan --config examples/configs/trapo_qwen2.5_32b.yaml --nodes 6
# Paths in the config (checkpoints, data, runs/) must be on a filesystem every node shares.
#SBATCH --job-name=trapo-32b
#SBATCH --nodes=6
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=trapo-32b-%j.out
# Preemption and time limits: 5 min before the end Slurm sends SIGUSR1 to the launcher (this
# script execs it), which has the trainer finish its step, save and exit 75; the launcher then
# requeues the job (scontrol requeue) and the requeued job resumes from the checkpoint.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec "${PYTHON:-python}" -m megatron_trapo.cli launch \
  --config "${TRAPO_CONFIG:-examples/configs/trapo_qwen2.5_32b.yaml}" "$@"
