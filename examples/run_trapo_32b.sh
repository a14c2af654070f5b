#!/usr/bin/env bash
# TRAPO on Qwen2.5-32B, multi-node H100 (inside the Dockerfile's image). Run it on every
# trainer node (e.g. `srun --nodes=2 --ntasks-per-node=1 bash examples/run_trapo_32b.sh`):
# torchrun rendezvous comes from Slurm's environment. Rollouts go to SGLang servers started
# beforehand on the rollout nodes; pass their URLs comma-separated in SGLANG_URLS.
# Extra arguments are config overrides (e.g. train_iters=10) or --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SGLANG_URLS:?set SGLANG_URLS=http://node3:30000,http://node4:30000,...}"
NNODES=${SLURM_NNODES:-${NNODES:-2}}
NODE_RANK=${SLURM_NODEID:-${NODE_RANK:-0}}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS_PER_NODE:-8}
URLS="[$(echo "$SGLANG_URLS" | sed 's/,/","/g; s/^/"/; s/$/"/')]"
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec python -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$GPUS" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_trapo.cli train --config examples/configs/trapo_qwen2.5_32b.yaml \
  "rollout.server_urls=$URLS" "$@"
