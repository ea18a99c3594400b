#!/usr/bin/env bash
# Sets up .venv with vermouth-cache (editable), every optional extra (s3, dist, plots) and the test
# dependencies: the `test` extra of pyproject.toml. Idempotent.
# torch: the CPU build is installed when none is present (on a GPU machine, install your CUDA
# build of torch into .venv first, or set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
