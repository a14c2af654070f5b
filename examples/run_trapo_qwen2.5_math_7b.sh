#!/usr/bin/env bash
# TRAPO on Qwen2.5-Math-7B (16k-context base), the paper's main setting, on ONE 8-GPU node:
# GPUs 0-3 train (TP 4), GPUs 4-7 run four single-GPU SGLang servers.
#   sbatch examples/run_trapo_qwen2.5_math_7b.sh [key=value ...] [--resume]
# or `bash` it inside an allocation / on a GPU machine without Slurm, or add `--dry-run`.
#SBATCH --job-name=trapo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=trapo-7b-%j.out
# Preemption and time limits: 5 min before the end Slurm sends SIGUSR1 to the launcher (this
# script execs it), which has the trainer finish its step, save and exit 75; the launcher then
# requeues the job (scontrol requeue) and the requeued job resumes from the checkpoint.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec "${PYTHON:-python}" -m megatron_trapo.cli launch \
  --config "${TRAPO_CONFIG:-examples/configs/trapo_qwen2.5_math_7b.yaml}" "$@"
