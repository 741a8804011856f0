#!/usr/bin/env bash
# One-command GPU check (tools/gpu_check.py has the steps and the summary format):
#   bash tools/gpu_check.sh [--dry-run] [--only STEP,...] [--out DIR]
# Needs one CUDA GPU and the project installed (tools/setup_env.sh; offline:
# MOETRAIN_WHEELHOUSE=DIR). Writes DIR/gpu_check.json; exits non-zero when a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
