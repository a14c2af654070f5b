# GPU image for megatron_trapo: NGC PyTorch (CUDA torch, Transformer Engine, NVIDIA apex and
# NCCL prebuilt), plus megatron-core and the rollout engines. Build on a machine with Docker:
#   docker build -t megatron_trapo:latest --build-arg ENGINES=sglang .
# NVIDIA apex comes from the base image; never `pip install apex` (that PyPI name is an
# unrelated project).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

# sglang | vllm | none — which rollout engine extra to install.
ARG ENGINES=sglang
ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/megatron_trapo
COPY setup.py README.md ./
COPY megatron_trapo ./megatron_trapo
# The base image's torch must stay: install without letting pip replace it.
RUN pip install --no-deps -e . \
 && pip install "megatron-core==0.16.1" psutil "omegaconf>=2.3" pyyaml tqdm \
 && if [ "$ENGINES" = "sglang" ]; then pip install -e ".[sglang]"; fi \
 && if [ "$ENGINES" = "vllm" ]; then pip install -e ".[vllm]"; fi \
 && python -c "import torch, transformer_engine, megatron.core, megatron_trapo; print(torch.__version__, megatron.core.__version__)"
COPY . .
CMD ["bash"]
