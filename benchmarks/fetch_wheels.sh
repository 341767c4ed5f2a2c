#!/usr/bin/env bash
# Fill benchmarks/wheels/ with what `benchmarks/gpu_check.sh` installs on a GPU machine that has
# no package index: ditf's dependencies missing from that machine's image (it has CUDA torch,
# transformers, huggingface_hub, safetensors, numpy, pillow, typer, rich, opencv, pyyaml, ...).
# Wheels for CPython 3.12 on x86-64 Linux (the GPU image's python3), no dependencies resolved:
# each one that is missing there is named here. Run it here (with internet), then carry
# benchmarks/wheels to the GPU machine with the working tree (it is git-ignored; ~15 MB).
# numba is left out on purpose (llvmlite alone is ~55 MB, past what a run may carry): without it
# the CPU side of the GPU check matches through torch's kernels (`match/kernels.py`, `available()`).
#
#     benchmarks/fetch_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")"
python=${1:-python3}
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.8.0 \
    diffusers==0.42.1 importlib_metadata==8.7.0
ls -l wheels
