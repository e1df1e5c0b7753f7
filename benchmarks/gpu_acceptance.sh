#!/usr/bin/env bash
# GPU acceptance: everything a new GPU machine should show, in one call of at most 6 minutes on one
# H200, every row kept as it is measured (benchmarks/acceptance.py has the sections, limits and files).
#
#   bash benchmarks/gpu_acceptance.sh [--tiny] [--only SECTION[,SECTION]] [OUT_DIR]
#
# The Python is $PYTHON, else the first of python3 and python that imports torch (on the GPU
# machines python3 is the one with torch); the checkout goes first on PYTHONPATH (fastssl runs from
# it, no install needed).  --help: the sections, the files and the exit status.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for c in python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then PY="$(command -v "$c")"; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_acceptance.sh: no python3 or python on PATH imports torch (set PYTHON=...)" >&2
    exit 2
fi
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.acceptance "$@"
