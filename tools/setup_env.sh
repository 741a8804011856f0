#!/usr/bin/env bash
# Install moetrain (editable) with its test/tool extras into the current Python.
# CPU machines get the pinned CPU torch; set MOETRAIN_TORCH=skip to keep an existing (CUDA) torch.
set -euo pipefail
# Offline (GPU nodes without a package index): MOETRAIN_WHEELHOUSE=DIR, made by
# tools/make_wheelhouse.sh. Every install then reads only DIR (--no-index), pip's isolated build
# of moetrain included (DIR ships setuptools), and the installed torch is kept (DIR has none).
# Resolved before the cd so that a relative DIR means the caller's directory.
WHEELHOUSE=
if [ -n "${MOETRAIN_WHEELHOUSE:-}" ]; then
  WHEELHOUSE=$(CDPATH= cd "$MOETRAIN_WHEELHOUSE" 2>/dev/null && pwd) ||
    { echo "setup_env.sh: MOETRAIN_WHEELHOUSE=$MOETRAIN_WHEELHOUSE is not a directory" >&2; exit 1; }
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OFFLINE=()
if [ -n "$WHEELHOUSE" ]; then
  $PY -c "import torch" 2>/dev/null || { echo "setup_env.sh: offline mode (MOETRAIN_WHEELHOUSE) keeps" \
    "the installed torch, but $PY cannot import torch: install a (CUDA) torch into it first" >&2; exit 1; }
  want=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  have=$(sed -n 's/^# python: \([0-9.]*\).*/\1/p' "$WHEELHOUSE/requirements-offline.txt" 2>/dev/null || true)
  [ -z "$have" ] || [ "$have" = "$want" ] || { echo "setup_env.sh: $WHEELHOUSE holds wheels for" \
    "Python $have but $PY is $want: rerun tools/make_wheelhouse.sh --python $want" >&2; exit 1; }
  OFFLINE=(--no-index --find-links "$WHEELHOUSE")
  MOETRAIN_TORCH=skip
fi
# Online this is exactly `$PY -m pip install -q ARGS` (the expansion below is bash 3.2-safe).
pip_install() { $PY -m pip install -q ${OFFLINE[@]+"${OFFLINE[@]}"} "$@"; }
if [ "${MOETRAIN_TORCH:-}" != "skip" ]; then
  pip_install -r requirements/cpu.txt
fi
pip_install -e ".[dev,hf]"
# GPU stats in metrics.jsonl (nvidia-ml-py) where this torch sees a GPU
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  pip_install "nvidia-ml-py>=12"
fi
# MPI launch (launch/mpirun.sh and its test): mpi4py plus the `mpich` wheel, which brings libmpi
# and mpiexec into this Python's bin/. Clusters with their own MPI: MOETRAIN_MPI=skip, then
# `pip install mpi4py` built against it.
if [ "${MOETRAIN_MPI:-}" != "skip" ]; then
  pip_install "mpi4py>=4" "mpich>=4"
fi
# Slurm for the launcher test is not installed here: tests/launch/test_slurm_launch.py starts a
# private one-node Slurm through tools/ci/slurm_up.sh (apt-get, root), or skips saying why.

# DeepSpeed (train.engine=deepspeed and its tests; tools/bench_moe.py, tools/bench_memory.py).
# Pinned to the tested version. Its only heavy requirement is torch>=2.0, already satisfied
# above, so pip keeps our torch; it installs from an sdist without compiling any op (~15 s).
# MOETRAIN_DEEPSPEED=skip leaves it out (its tests then skip, saying why).
if [ "${MOETRAIN_DEEPSPEED:-}" != "skip" ]; then
  pip_install "deepspeed==0.19.8"
fi
