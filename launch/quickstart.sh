#!/usr/bin/env bash
# README command 1: set up, then train the tiny MoE model on the embedded corpus (Python's own
# standard library) across 2 CPU processes with expert parallelism (ep=2). Extra arguments are
# config overrides, e.g.  bash launch/quickstart.sh train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=${PYTHON:-python3}
NPROC=${NPROC:-2}
exec $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m moetrain.train \
  --config configs/tiny_cpu.yaml parallel.ep="$NPROC" "$@"
