# Shared by launch/torchrun.sh, launch/mpirun.sh and launch/slurm.sbatch (sourced, not run).

# need OPTION VALUE: an option that takes a value got none -> one error line, exit 2
need() { [ -n "${2:-}" ] || { echo "${LAUNCHER:-launch}: $1 needs a value" >&2; exit 2; }; }

# MOETRAIN_IFNAME: one network interface for NCCL and gloo, unless those are set separately
export_ifname() {
  if [ -n "${MOETRAIN_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$MOETRAIN_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$MOETRAIN_IFNAME}
  fi
}

# moetrain prefers torchrun's variables over the launcher's (Slurm, MPI): drop strays from the
# calling shell, which would otherwise turn every task into "rank 0 of 1"
drop_torchrun_env() { unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE; }
