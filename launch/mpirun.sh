#!/usr/bin/env bash
# moetrain under MPI (Open MPI, MPICH, Intel MPI): mpiexec starts the ranks, MPI says who is who.
#
#   launch/mpirun.sh [-n N] [--hostfile FILE] [--] [--config FILE] [group.key=value ...]
#   NPROC=4 launch/mpirun.sh --config configs/X.yaml parallel.ep=4
#
# MPI is used for the start-up only: each rank reads its rank/world from the MPI launcher's
# environment (OMPI_COMM_WORLD_* or PMI_*), then rank 0 broadcasts its address and a free port
# through mpi4py (moetrain/parallel/mesh.py) and the training itself runs on NCCL (GPU) or gloo
# (CPU). Needs `pip install mpi4py` built for the same MPI as mpiexec; the `mpich` wheel from
# PyPI gives both a working mpiexec and libmpi (`pip install mpi4py mpich`).
#
# Options (environment variable in brackets; options win):
#   -n, -np N            ranks [NPROC; default 2]
#   --hostfile FILE      hosts for multi-node runs [HOSTFILE]
#   --config FILE        moetrain config [CONFIG; default configs/tiny_cpu.yaml]
#   MPIEXEC              launcher [default mpiexec]; MPIEXEC_ARGS: extra launcher arguments
#   PYTHON               interpreter [default python3]
#   MASTER_ADDR          override the address rank 0 announces (e.g. its InfiniBand name)
#   MOETRAIN_IFNAME      network interface for NCCL and gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
# Everything else is passed to `python -m moetrain.train` as config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER=mpirun.sh
# shellcheck source=launch/_common.sh
source launch/_common.sh
PYTHON=${PYTHON:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
nproc=${NPROC:-2}
hostfile=${HOSTFILE:-}
config=${CONFIG:-configs/tiny_cpu.yaml}
while [ $# -gt 0 ]; do
  case "$1" in
    -n|-np) need "$1" "${2:-}"; nproc=$2; shift 2 ;;
    --hostfile|-f) need "$1" "${2:-}"; hostfile=$2; shift 2 ;;
    --config|-c) need "$1" "${2:-}"; config=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ "${1:-}" = "--config" ] || [ "${1:-}" = "-c" ]; then
  need "$1" "${2:-}"; config=$2; shift 2
fi
if ! command -v "$MPIEXEC" >/dev/null; then
  # the mpich wheel puts mpiexec beside the interpreter, which may not be on PATH (venv not activated)
  beside=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')/mpiexec
  [ -x "$beside" ] || { echo "mpirun.sh: $MPIEXEC not found: pip install mpi4py mpich" >&2; exit 2; }
  MPIEXEC=$beside
fi
"$PYTHON" -c "import mpi4py" 2>/dev/null || { echo "mpirun.sh: mpi4py is not installed for $PYTHON: pip install mpi4py mpich" >&2; exit 2; }

export_ifname
drop_torchrun_env

args=(-n "$nproc")
mpi_version=$("$MPIEXEC" --version 2>&1 || true)
if [[ "${mpi_version,,}" == *"open mpi"* || "${mpi_version,,}" == *"open-mpi"* ]]; then
  if [ -n "$hostfile" ]; then args+=(--hostfile "$hostfile"); fi
  # Open MPI refuses to run as root without this flag; MPICH's hydra does not know it
  if [ "$(id -u)" = 0 ]; then args+=(--allow-run-as-root); fi
  # Open MPI forwards no environment to remote nodes unless told (hydra forwards all of it)
  for v in PATH PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME \
           MOETRAIN_DIST_TIMEOUT MASTER_ADDR; do
    if [ -n "${!v:-}" ]; then args+=(-x "$v"); fi
  done
else
  if [ -n "$hostfile" ]; then args+=(-f "$hostfile"); fi
fi
# shellcheck disable=SC2086
exec "$MPIEXEC" "${args[@]}" ${MPIEXEC_ARGS:-} "$PYTHON" -m moetrain.train --config "$config" "$@"
