#!/usr/bin/env bash
# The CPU demo: train a tiny Megatron GPT with TP=2 + sequence parallel on two gloo
# processes, save checkpoints, log metrics to runs/smoke_tiny/metrics.jsonl.
# Extra arguments are config overrides, e.g. `train_iters=100` or `--resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m megatron_trapo.cli smoke --config examples/configs/smoke_tiny.yaml "$@"
