"""Write an HF model folder as the FP8 export SGLang and vLLM serve (``quant_method: fp8``,
fp8 decoder linears with ``weight_scale_inv`` per block or ``weight_scale`` per tensor,
quantized by nvidia-modelopt): the checkpoint servers must start from when the trainer syncs
FP8 weights to them (``rollout.quantization=fp8``).

    python tools/quantize_fp8.py HF_DIR OUT_DIR [--block-size 128 128 | --block-size none]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", help="HF folder (config.json + safetensors)")
    ap.add_argument("out_dir")
    ap.add_argument("--block-size", nargs="+", default=["128", "128"],
                    help="two sizes (rollout.fp8_block_size), or 'none' for per-tensor scales")
    args = ap.parse_args(argv)
    if args.block_size == ["none"]:
        block = None
    elif len(args.block_size) == 2 and all(b.isdigit() and int(b) > 0 for b in args.block_size):
        block = [int(b) for b in args.block_size]
    else:
        ap.error(f"--block-size: two positive sizes or 'none', got {' '.join(args.block_size)}")
    if not (Path(args.hf_dir) / "config.json").is_file():
        ap.error(f"hf_dir {args.hf_dir}: no config.json")
    from megatron_trapo.rollout import fp8  # lazy: --help without torch

    try:
        counts = fp8.export_folder(args.hf_dir, args.out_dir, block)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"wrote {args.out_dir}: {counts['quantized']} fp8 weights (block {block or 'per tensor'}),"
          f" {counts['kept']} tensors kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
