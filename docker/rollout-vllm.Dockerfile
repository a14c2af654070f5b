# vLLM rollout image: the official vLLM image of the tested version (its torch and kernels
# match each other), started with the dev/RL endpoints on — the trainer's weight sync
# (rollout.weight_sync=disk) calls /pause, /collective_rpc reload_weights, /reset_prefix_cache
# and /resume, which vLLM serves only with VLLM_SERVER_DEV_MODE=1. Those endpoints are not
# authenticated: keep the servers on the cluster's private network.
#   docker build -f docker/rollout-vllm.Dockerfile -t megatron_trapo:rollout-vllm .
#   docker run --gpus all --network host -v /shared:/shared megatron_trapo:rollout-vllm \
#     --model /shared/models/Qwen2.5-Math-7B --port 8000 --tensor-parallel-size 4
# Weights arrive as HF folders under rollout.weight_sync_dir: mount that shared filesystem.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV VLLM_SERVER_DEV_MODE=1 \
    PYTHONUNBUFFERED=1
