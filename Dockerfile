# Trainer image: NGC PyTorch (its CUDA torch, Transformer Engine, NVIDIA apex and NCCL are kept)
# plus megatron-core and the project's dependencies. The rollout servers run in their own
# image (docker/rollout.Dockerfile, on the official SGLang image): sglang and vllm pin their own
# torch/NCCL builds, which NGC's pip constraints (/etc/pip/constraint.txt) forbid here — and
# which would break TE/apex if they replaced NGC's torch.
#   docker build -t megatron_trapo:trainer .
# NGC 25.11 ships Transformer Engine 2.9, inside megatron-core 0.16.1's tested range
# (>=2.9,<2.12). Never `pip install apex`: that PyPI name is an unrelated project.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /workspace/megatron_trapo
COPY setup.py README.md ./
COPY megatron_trapo ./megatron_trapo
# Under NGC's constraint file pip keeps the image's torch (the torch>=2.6 requirement is met
# by it) and installs everything else the project declares; the check fails the build if TE,
# apex's fused kernels or torch were broken.
RUN pip install --no-build-isolation -e ".[tensorboard]" \
 && python -c "import torch, transformer_engine, megatron.core, megatron_trapo; \
from megatron.core.tensor_parallel import layers; \
assert layers._grad_accum_fusion_available, 'apex fused_weight_gradient_mlp_cuda missing'; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
COPY . .
CMD ["bash"]
