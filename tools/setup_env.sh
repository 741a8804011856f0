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
# MPI launch (launch/mpirun.sh and its test): mpi4py plus the `mpich` wheel, which brings libmpi
# and mpiexec into this Python's bin/. Clusters with their own MPI: MOETRAIN_MPI=skip, then
# `pip install mpi4py` built against it.
if [ "${MOETRAIN_MPI:-}" != "skip" ]; then
  $PY -m pip install -q "mpi4py>=4" "mpich>=4"
fi
# Slurm for the launcher test is not installed here: tests/launch/test_slurm_launch.py starts a
# private one-node Slurm through tools/ci/slurm_up.sh (apt-get, root), or skips saying why.

# DeepSpeed (train.engine=deepspeed and its tests; tools/bench_moe.py, tools/bench_memory.py).
# Pinned to the tested version. Its only heavy requirement is torch>=2.0, already satisfied
# above, so pip keeps our torch; it installs from an sdist without compiling any op (~15 s).
# MOETRAIN_DEEPSPEED=skip leaves it out (its tests then skip, saying why).
if [ "${MOETRAIN_DEEPSPEED:-}" != "skip" ]; then
  $PY -m pip install -q "deepspeed==0.19.8"
fi
