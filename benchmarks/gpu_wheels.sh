#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks, as wheels for its Python 3.12, into .whl/ (ignored by
# git; the device tool carries it). Run here, where PyPI is reachable, before the device call:
#   benchmarks/gpu_wheels.sh           then carry ".whl" and run benchmarks/gpu_check.sh OUT there
# The image already has torch, triton, transformers, huggingface-hub, safetensors, regex and zipp.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(grep -E '^diffusers==' requirements.txt | cut -d' ' -f1)" importlib_metadata==8.7.0 nvtx==0.2.17
ls -l .whl
