#!/usr/bin/env bash
# Create .venv in the project root (if missing) and install emtwin with every extra, torch pinned
# by constraints.txt (the CPU build; a range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "emtwin needs Python >= 3.10 (found $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,sdk,tem,dask]"
echo "emtwin installed in .venv ($(.venv/bin/python -c 'import twin; print(twin.__version__)'))"
