"""Which launcher's variables win: torchrun, then MPI, then Slurm (whose variables leak into every
process started inside an allocation)."""
from __future__ import annotations

import pytest

from moetrain.parallel.mesh import LaunchError, read_launch_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "OMPI_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
               "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")

# what a batch script's own environment holds: the batch step is task 0 of 1
BATCH_STEP = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1"}


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)

    def set_env(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, v)
    return set_env


def test_single_process(env):
    e = read_launch_env()
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


def test_srun_task(env):
    env(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_TASKS_PER_NODE="2(x4)")
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launcher) == (3, 8, 1, 2, "slurm")


def test_torchrun_inside_allocation(env):
    env(**BATCH_STEP, RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (1, 4, 1, "torchrun")


def test_mpich_inside_allocation(env):
    env(**BATCH_STEP, PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2")
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launcher) == (1, 2, 1, 2, "mpi")


def test_openmpi_inside_allocation(env):
    env(**BATCH_STEP, OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4",
        OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (2, 4, 0, "mpi")


def test_incomplete_environment_is_one_line(env):
    env(PMI_RANK="0")
    with pytest.raises(LaunchError, match="PMI_SIZE"):
        read_launch_env()
