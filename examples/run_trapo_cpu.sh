#!/usr/bin/env bash
# The CPU demo, end to end: Table 1 of TRAPO at CPU scale. A synthetic multi-step arithmetic
# task and a local tokenizer, a tiny base model "pretrained" with SFT on the short problems
# (cached in the output folder), then SFT, GRPO, SFT-then-RL, LUFFY and TRAPO from that base
# (Megatron-Core trainer on 2 gloo processes, rollouts on the HF engine with in-process weight
# sync), held-out accuracy overall and per difficulty, results.md and plots. Extra arguments
# go to `python -m megatron_trapo.cpu_demo.compare` (--quick, --seeds 3, --ablation, --tune,
# --methods, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m megatron_trapo.cpu_demo.compare --out runs/cpu_demo "$@"
