"""The GPU smoke's training part: a 3-step TP=1 TRAPO run of a tiny Qwen2-shaped model (local
layer spec, bf16) with the HF rollout engine on the same GPU and in-process weight
sync, on the CPU demo's synthetic task; prints step time, tokens/s and peak memory. Then one
step with FP8 rollouts (rollout.quantization=fp8, TIS on), printing the engine-vs-trainer
logprob gap, when nvidia-modelopt imports. Run by scripts/gpu_smoke.sh after the device
check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_trapo.cpu_demo.stage import MODEL
from megatron_trapo.cpu_demo.task import QUICK, prepare


def run(out: Path, data: Path, device: str, name: str, iters: int, extra: dict) -> int:
    overrides = {**MODEL, "model.add_qkv_bias": "true", "model.hf_architecture": "Qwen2ForCausalLM",
                 "model.params_dtype": "bf16", "model.transformer_impl": "local",
                 "rollout.device": device, "rollout.dtype": "bf16",
                 "rollout.tokenizer_path": data / "tokenizer", "train_data": data / "train.jsonl",
                 "loss.loss_mode": "trapo", "loss.max_response_length": 64,
                 "prompts_per_step": 16, "train_iters": iters, "optimizer.lr": 1e-4,
                 "batching.max_tokens_per_microbatch": 8192, "log_dir": out / name, **extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "megatron_trapo.cli", "train", *[f"{k}={v}" for k, v in overrides.items()]]
    print("$", " ".join(map(str, cmd)), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"gpu smoke: {name} run failed (exit {proc.returncode})")
        return proc.returncode
    steps = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step_time_s" in s]
    for s in steps:
        print(f"step {s['step']}: {s['step_time_s']:.2f} s, {s['train/tokens_per_s']:.0f} "
              f"train tokens/s, peak memory {s['memory/peak_gb']:.2f} GiB, loss {s['loss']:.4f}, "
              f"reward {s.get('rollout/reward_unguided', float('nan')):.3f}, "
              f"guided {s['rollout/guided_fraction']:.2f}"
              + "".join(f", {k.split('/')[1]} {s[k]:.3g}" for k in (
                  "pg/rollout_logprob_gap", "pg/rollout_k3", "pg/tis_weight_mean") if k in s))
    print(f"gpu smoke: {name} {len(steps)} steps OK in {time.time() - t0:.0f} s (incl. start-up)")
    return 0


def main() -> int:
    out = Path(os.environ.get("GPU_SMOKE_OUT", "runs/gpu_smoke")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(out / "data", QUICK)
    device = os.environ.get("GPU_SMOKE_DEVICE", "cuda")
    rc = run(out, out / "data", device, "trapo", int(os.environ.get("GPU_SMOKE_ITERS", 3)), {})
    if rc:
        return rc
    try:
        import modelopt.torch.quantization.qtensor  # noqa: F401  (the FP8 quantizer)
    except ImportError as exc:
        print(f"gpu smoke: FP8 rollout step skipped (nvidia-modelopt does not import: {exc})")
        return 0
    return run(out, out / "data", device, "trapo_fp8_rollouts", 1,
               {"rollout.quantization": "fp8"})


if __name__ == "__main__":
    raise SystemExit(main())
