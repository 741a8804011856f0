"""Which launcher's variables win: torchrun, then MPI, then Slurm (whose variables leak into every
process started inside an allocation)."""
from __future__ import annotations

import os

import pytest

from moetrain.parallel import mesh, rendezvous
from moetrain.parallel.mesh import LaunchError, first_slurm_host, read_launch_env

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


# --------------------------------------------------------------------------- rendezvous address

@pytest.mark.parametrize("nodelist, host", [
    ("n1", "n1"), ("gpu[003-010,20]", "gpu003"), ("a[1-2],b[5]", "a1"), ("rack[1-2]-n[7-8]", "rack1-n7"),
    ("node-01.cluster", "node-01.cluster"), ("", None), ("x[", None)])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.fixture
def rdv(env, monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID",
              "MOETRAIN_DIST_TIMEOUT"):
        monkeypatch.setenv(k, "x")        # recorded, so what the code under test sets is undone too
        monkeypatch.delenv(k)
    return env


def test_plain_srun_derives_master_from_the_job(rdv):
    """srun without the batch script's exports: the job's first node, a port from the job id."""
    rdv(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="cn[07-08]", SLURM_JOB_ID="123456")
    mesh._ensure_rendezvous(read_launch_env())
    assert os.environ["MASTER_ADDR"] == "cn07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)      # the Slurm rule (moetrain/parallel/mesh.py)


def test_srun_without_job_info_is_one_line(rdv):
    rdv(SLURM_PROCID="1", SLURM_NTASKS="2")
    with pytest.raises(LaunchError, match="MASTER_ADDR/MASTER_PORT are not set"):
        mesh._ensure_rendezvous(read_launch_env())


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_bad_master_port_is_one_line(rdv, port):
    rdv(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    with pytest.raises(LaunchError, match=f"MASTER_PORT='{port}' is not"):
        mesh._ensure_rendezvous(read_launch_env())


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "inf", "nan", "1e300"])
def test_bad_dist_timeout_is_one_line(rdv, raw):
    rdv(MOETRAIN_DIST_TIMEOUT=raw)
    with pytest.raises(LaunchError, match="MOETRAIN_DIST_TIMEOUT"):
        mesh._timeout(None)
    rdv(MOETRAIN_DIST_TIMEOUT="30")
    assert mesh._timeout(None).total_seconds() == 30


def test_mpi_variables_without_mpiexec_are_refused(rdv):
    """PMI_SIZE=2 in a process that mpi4py sees as a world of 1 would wait for a peer forever."""
    pytest.importorskip("mpi4py")
    rdv(PMI_RANK="0", PMI_SIZE="2")
    with pytest.raises(LaunchError, match="MPI world 2 but MPI reports 1"):
        mesh._ensure_rendezvous(read_launch_env())


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "inf", "nan", "1e300"])
def test_bad_rendezvous_timeout_is_one_line(monkeypatch, raw):
    monkeypatch.setenv("MOETRAIN_RENDEZVOUS_TIMEOUT", raw)
    with pytest.raises(LaunchError, match="MOETRAIN_RENDEZVOUS_TIMEOUT"):
        rendezvous.rendezvous_timeout()
    monkeypatch.setenv("MOETRAIN_RENDEZVOUS_TIMEOUT", "7.5")
    assert rendezvous.rendezvous_timeout() == 7.5
    monkeypatch.delenv("MOETRAIN_RENDEZVOUS_TIMEOUT")
    assert rendezvous.rendezvous_timeout() == rendezvous.DEFAULT_RENDEZVOUS_TIMEOUT_S == 300


def test_rendezvous_timeout_is_separate_from_the_collective_timeout(monkeypatch):
    """A rank that never arrives ends the others at the (short) rendezvous timeout; a collective
    that waits on a slow peer later still gets MOETRAIN_DIST_TIMEOUT."""
    monkeypatch.setenv("MOETRAIN_RENDEZVOUS_TIMEOUT", "5")
    monkeypatch.setenv("MOETRAIN_DIST_TIMEOUT", "900")
    assert rendezvous.rendezvous_timeout() == 5 and mesh._timeout(None).total_seconds() == 900
