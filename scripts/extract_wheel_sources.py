"""Keep a few Python source files of a wheel that is too big or too CUDA-bound to install here.

The vLLM contract test reads vLLM's own HTTP routers and worker code; the wheel is 330 MB of
CUDA kernels around them. This downloads the pinned wheel (no dependencies), extracts the
files matching the patterns into OUT, marks OUT complete and deletes the wheel. Idempotent.

    python scripts/extract_wheel_sources.py vllm==0.33.0 .cache/vllm-0.33.0 'vllm/entrypoints/*'
"""
from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MARK = "EXTRACTED_FROM"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="a pinned requirement, e.g. vllm==0.33.0")
    ap.add_argument("out", type=Path)
    ap.add_argument("patterns", nargs="+", help="fnmatch patterns of paths inside the wheel")
    args = ap.parse_args(argv)
    mark = args.out / MARK
    if mark.is_file() and mark.read_text().split("\n")[0] == args.spec:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary", ":all:", args.spec, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"pip download {args.spec} gave {wheels}, expected one wheel")
        kept = []
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in zf.namelist():
                if name.endswith(".py") and any(fnmatch.fnmatch(name, p) for p in args.patterns):
                    zf.extract(name, args.out)
                    kept.append(name)
    if not kept:
        raise SystemExit(f"no file of {args.spec} matches {args.patterns}")
    mark.write_text(f"{args.spec}\n{wheels[0].name}\n" + "\n".join(kept) + "\n")
    print(f"{args.spec}: {len(kept)} source files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
