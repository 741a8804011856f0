"""launch/mpirun.sh for real: `mpiexec -n 2` (the `mpich` wheel) with the rendezvous agreed through
mpi4py, a 3-step tiny EP run."""
from __future__ import annotations

import pytest

from _launch import REPO, assert_trained, finish, launch_env, mpi_skip_reason, start, tail, tiny_overrides
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop


@pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))
def test_mpiexec_two_ranks(tmp_path):
    log = tmp_path / "mpirun.log"
    cmd = ["bash", str(REPO / "launch/mpirun.sh"), "-n", "2", "--config", "configs/tiny_cpu.yaml",
           *tiny_overrides(tmp_path)]
    (code,) = finish([start(cmd, log, launch_env())], timeout_s=120)
    assert code == 0, tail(log)
    assert_trained(tmp_path / "runs" / "run", world=2)
