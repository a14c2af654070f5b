#!/usr/bin/env bash
# Template: evaluate a model as Slurm job arrays (one task per shard, each with its own SGLang
# server, then an aggregation job), optionally inside a container:
#   bash scripts/slurm/eval.sh MODEL_OR_CHECKPOINT OUT_DIR slurm.partition=h100 \
#     [slurm.container_image=nvcr.io#myteam/megatron_trapo:rollout slurm.container_mounts=/lustre:/lustre]
# It submits and returns; `megatron-trapo eval-resubmit OUT_DIR` reruns only failed shards.
set -euo pipefail
exec bash "$(dirname "$0")/../../examples/eval_slurm.sh" "$@"
