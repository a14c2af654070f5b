#!/usr/bin/env bash
# Evaluate a checkpoint on the paper's six benchmarks as a Slurm job array (one task per shard,
# each with its own SGLang server) plus an aggregation job; prints the job ids and returns.
#   bash examples/eval_slurm.sh ckpt/trapo-7b runs/eval/trapo-7b slurm.partition=h100 [...]
# The first argument is a Megatron checkpoint folder or an HF model folder.
# Then: squeue --me; runs/eval/.../summary.md when the aggregation job is done;
# a failed shard: `megatron-trapo eval-resubmit runs/eval/...` reruns only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: eval_slurm.sh MODEL_OR_CHECKPOINT OUT_DIR [key=value ...]}
OUT=${2:?usage: eval_slurm.sh MODEL_OR_CHECKPOINT OUT_DIR [key=value ...]}
shift 2
if [ -f "$MODEL/config.json" ]; then SRC="model_path=$MODEL"; else SRC="load=$MODEL"; fi
exec python -m megatron_trapo.cli eval --config examples/configs/eval_paper.yaml --slurm \
  "$SRC" "output_dir=$OUT" "$@"
