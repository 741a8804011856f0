#!/usr/bin/env bash
# Install moetrain (editable) with its test/tool extras into the current Python.
# CPU machines get the pinned CPU torch; set MOETRAIN_TORCH=skip to keep an existing (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${MOETRAIN_TORCH:-}" != "skip" ]; then
  $PY -m pip install -q -r requirements/cpu.txt
fi
$PY -m pip install -q -e ".[dev]"
