#!/usr/bin/env python
"""Convert a megatron_trapo checkpoint (any TP/PP layout) into HF safetensors + config +
tokenizer, loadable by transformers, SGLang and vLLM. Vocab padding is removed.

    python tools/convert_mcore_to_hf.py --mcore-dir ckpt/run1 --out-dir hf/run1 [--iteration N]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mcore-dir", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt)")
    ap.add_argument("--out-dir", required=True, help="HF output folder")
    ap.add_argument("--iteration", type=int, default=None, help="default: the latest")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                    help="dtype of the written tensors (default: the checkpoint's)")
    ap.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB")
    args = ap.parse_args()

    from megatron_trapo.platform import quiet_known_warnings
    from megatron_trapo.config import ConfigError
    from megatron_trapo.conversion import convert_mcore_to_hf

    quiet_known_warnings()
    try:
        stats = convert_mcore_to_hf(args.mcore_dir, args.out_dir, args.dtype,
                                    _size(args.max_shard_size), args.iteration)
    except ConfigError as exc:
        print(f"convert_mcore_to_hf: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":  # required: the worker re-imports __main__
    sys.exit(main())
