# Rollout image: the official SGLang image of the pinned version (its torch, NCCL,
# flashinfer and sgl-kernel builds match each other), plus sglang-router and this project
# installed without dependencies — only its SGLang client-side code and tools run here.
#   docker build -f docker/rollout.Dockerfile -t megatron_trapo:rollout .
# The trainer's NCCL (NGC image) and SGLang's (this image) meet in the weight-update group;
# check `python -c "import torch; print(torch.cuda.nccl.version())"` in both before a run.
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23-cu129
FROM ${SGLANG_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    SGLANG_RETURN_ORIGINAL_LOGPROB=1

WORKDIR /workspace/megatron_trapo
COPY setup.py README.md ./
COPY megatron_trapo ./megatron_trapo
RUN pip install --no-deps -e . \
 && pip install "sglang-router==0.3.2" "omegaconf==2.4.0" "math-verify[antlr4_13_2]==0.9.0" "pebble==5.2.3" \
 && python -c "import sglang, sglang_router, megatron_trapo; print('sglang', sglang.__version__)"
COPY . .
CMD ["bash"]
