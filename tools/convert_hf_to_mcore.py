#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Qwen2/Qwen2.5, Qwen3 dense, Llama 3 / SmolLM2) into a
Megatron-Core ``torch_dist`` checkpoint that ``megatron-trapo`` loads at any TP/PP layout.

    python tools/convert_hf_to_mcore.py --hf-dir Qwen2.5-Math-7B --out-dir ckpt/qwen-math-7b \
        --tp 2 --pp 1 [--dtype bf16] [--max-position-embeddings 16384 --rope-theta 40000]

Runs tp×pp CPU worker processes (no GPU needed); peak memory is about one model copy.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", required=True, help="HF model folder (config.json + safetensors)")
    ap.add_argument("--out-dir", required=True, help="where the Megatron checkpoint goes")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                    help="parameter dtype (default: the HF config's torch_dtype)")
    ap.add_argument("--max-position-embeddings", type=int, default=None,
                    help="context length to record instead of the HF config's (e.g. 16384)")
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="RoPE base instead of the HF config's (e.g. 40000 with 16384 positions)")
    args = ap.parse_args()
    context = {k: v for k, v in (("max_position_embeddings", args.max_position_embeddings),
                                 ("rope_theta", args.rope_theta)) if v is not None}

    from megatron_trapo.platform import quiet_known_warnings
    from megatron_trapo.config import ConfigError
    from megatron_trapo.conversion import convert_hf_to_mcore

    quiet_known_warnings()
    try:
        stats = convert_hf_to_mcore(args.hf_dir, args.out_dir, args.tp, args.pp, args.dtype,
                                    context)
    except ConfigError as exc:
        print(f"convert_hf_to_mcore: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in stats.items() if k != "model"}))
    return 0


if __name__ == "__main__":  # required: workers and the checkpoint writer re-import __main__
    sys.exit(main())
