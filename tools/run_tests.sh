#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=${PYTHON:-python3}
exec $PY -m pytest -q "$@"
