"""The FP8 export's config.json read by vLLM's own ``Fp8Config.from_config`` (its wheel, CPU
torch): the fields it parses out of ``quantization_config`` must be the ones we meant.

    python benchmarks/check_fp8_parsers.py EXPORT_DIR        # under a python that has vllm

vLLM's loader needs CUDA (or triton-cpu); its config parsing does not. A venv for it, without
vLLM's CUDA dependencies (measured with vllm 0.34.0):

    python -m venv /tmp/vllmvenv && /tmp/vllmvenv/bin/pip install torch==2.13.0 \\
        transformers==5.25.0 pydantic msgspec pyzmq cachetools cloudpickle psutil urllib3 \\
        aiohttp requests pillow pybase64 cbor2 uvloop py-cpuinfo prometheus_client \\
        llguidance xgrammar einops && /tmp/vllmvenv/bin/pip install --no-deps vllm==0.34.0

SGLang's ``Fp8Config`` module imports triton at the top and does not import on a CPU
(docs/notes/fp8_research.md); ``tests/servers/test_rollout.py`` serves the same export from
our protocol server instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    config = json.loads((Path(argv[0]) / "config.json").read_text())
    qc = config["quantization_config"]
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config  # their wheel's own

    parsed = Fp8Config.from_config(qc)
    got = {"is_checkpoint_fp8_serialized": parsed.is_checkpoint_fp8_serialized,
           "activation_scheme": parsed.activation_scheme,
           "weight_block_size": parsed.weight_block_size,
           "ignored_layers": parsed.ignored_layers}
    want = {"is_checkpoint_fp8_serialized": True, "activation_scheme": "dynamic",
            "weight_block_size": qc.get("weight_block_size"),
            "ignored_layers": qc["ignored_layers"]}
    print(json.dumps({"vllm Fp8Config.from_config": got}))
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        print(f"mismatch (got, wanted): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
