#!/usr/bin/env bash
# Download the wheels scripts/gpu_smoke.sh installs on a GPU machine that has CUDA torch but no
# network (e.g. a lent device machine): scripts/gpu_smoke_requirements.txt, without
# dependencies (torch stays the device's own), for Linux x86_64 / CPython 3.x.
#   bash scripts/fetch_gpu_wheels.sh [DIR]   (default .gpu_wheels; prints its size)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
mkdir -p "$DIR"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR" \
  -r scripts/gpu_smoke_requirements.txt
du -sh "$DIR"
