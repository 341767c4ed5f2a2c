#!/usr/bin/env bash
# One command that measures everything a GPU shows about ditf, offline, in at most 9 minutes
# on one H100/H200 (see benchmarks/gpu_check.py for the steps and docs/benchmarks.md).
#
#     benchmarks/gpu_check.sh [--out DIR] [--images N]   # on a GPU machine
#     benchmarks/gpu_check.sh --dry-run [--out DIR]      # the same steps on the CPU, tiny models
#
# The GPU machine has a CUDA torch and no package index: the rest of ditf's dependencies are
# installed from the wheels in benchmarks/wheels/ (filled beforehand by benchmarks/fetch_wheels.sh,
# carried with the working tree) into a scratch folder, never into the machine's Python.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dry_run=0
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then dry_run=1; fi
done
if [ "$dry_run" = 0 ] && compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/ditf-gpu-check-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        benchmarks/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
