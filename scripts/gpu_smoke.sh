#!/usr/bin/env bash
# GPU smoke for one lent GPU (fits in ~10 minutes on an H100/H200): CUDA torch must be there;
# megatron-core and the project's other pure-Python dependencies are installed from
# .gpu_wheels/ when present (bash scripts/fetch_gpu_wheels.sh makes it; no network needed).
# No Transformer Engine, SGLang or vLLM is assumed: megatron's local spec, bf16.
#   1. the device check's real-CUDA twin: a TRAPO forward/backward (padded and packed, four
#      loss modes) where every tensor must be on cuda (CI runs it on a fake GPU);
#   2. a 3-step TP=1 TRAPO run of a tiny Qwen2-shaped model, HF engine on the GPU,
#      in-process weight sync; prints step time, tokens/s and peak memory.
#   3. one step with FP8 rollouts (rollout.quantization=fp8) when nvidia-modelopt imports.
#   GPU_SMOKE_ALLOW_CPU=1 runs the same on a CPU machine (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
"$PY" - <<'PYEOF'
import os, torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if not torch.cuda.is_available() and os.environ.get("GPU_SMOKE_ALLOW_CPU") != "1":
    raise SystemExit("gpu_smoke: no CUDA device (GPU_SMOKE_ALLOW_CPU=1 to run it on the CPU)")
PYEOF
WHEELS=${GPU_WHEELS:-.gpu_wheels}
if [ -d "$WHEELS" ] && ! "$PY" -c "import megatron.core, transformers, omegaconf, math_verify" 2>/dev/null; then
  echo "installing $(ls "$WHEELS" | wc -l) wheels from $WHEELS (torch untouched)"
  "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
"$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)"
DEVICE=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=cpu; fi
echo "== 1. device check =="
if [ "${GPU_SMOKE_SKIP_DEVICE_CHECK:-0}" = 1 ]; then  # CI runs it on its own (fake GPU)
  echo "skipped (GPU_SMOKE_SKIP_DEVICE_CHECK=1)"
else
  time "$PY" -m megatron_trapo.train.device_check
fi
echo "== 2. TRAPO steps =="
GPU_SMOKE_DEVICE=$DEVICE time "$PY" scripts/gpu_smoke.py
