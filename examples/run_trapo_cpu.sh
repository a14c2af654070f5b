#!/usr/bin/env bash
# The CPU demo, end to end: synthetic task + local tokenizer, a tiny base model
# "pretrained" with SFT on easy problems, then SFT, GRPO, TRAPO and the plain-SFT ablation from
# that base (Megatron-Core trainer on 2 gloo processes, rollouts on the HF engine with
# in-process weight sync), held-out accuracy table and curves. Extra arguments go to
# `python -m megatron_trapo.cpu_demo.compare` (e.g. --quick, --seeds 3, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m megatron_trapo.cpu_demo.compare --out runs/cpu_demo "$@"
