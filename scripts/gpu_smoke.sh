#!/usr/bin/env bash
# GPU smoke of the real paths: Transformer Engine layer spec, NCCL, distributed optimizer,
# and (with FP8=1 on Hopper or newer) FP8 through TE. Run inside the Dockerfile's image.
#   NGPU=8 FP8=1 bash scripts/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
TP=${TP:-$(( NGPU >= 2 ? 2 : 1 ))}
EXTRA=()
if [ "${FP8:-0}" = "1" ]; then EXTRA+=(model.fp8=hybrid model.fp8_recipe=delayed); fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec python -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
  -m megatron_trapo.cli smoke model_preset=tiny model.transformer_impl=transformer_engine \
  model.params_dtype=bf16 parallel.tensor_model_parallel_size="$TP" \
  parallel.sequence_parallel=$([ "$TP" -gt 1 ] && echo true || echo false) \
  optimizer.use_distributed_optimizer=true checkpoint.save=checkpoints/gpu_smoke \
  log_dir=runs/gpu_smoke "${EXTRA[@]}" "$@"
