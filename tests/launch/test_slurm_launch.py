"""launch/slurm.sbatch on a real one-node Slurm (slurmctld + slurmd + munged on localhost, started
by tools/ci/slurm_up.sh, which installs Debian's slurm-wlm/munge with apt-get when missing).

If Slurm cannot start here (not root, no apt-get, no network for the install, daemons refuse),
every test in this module is skipped with slurm_up.sh's one-line reason. The daemons are stopped
at the end of the module by their pid files (tools/ci/slurm_down.sh), never by name.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from _launch import REPO, assert_trained, finish, launch_env, mpi_skip_reason, start, tail, tiny_overrides
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

UP = REPO / "tools/ci/slurm_up.sh"
DOWN = REPO / "tools/ci/slurm_down.sh"
CANNOT_START = 3          # slurm_up.sh's exit code for "this machine cannot run Slurm"


@pytest.fixture(scope="module")
def slurm_env():
    # not pytest's tmp dir: that is 0700 root, and munged (user munge) must reach its socket
    cluster = Path(tempfile.mkdtemp(prefix="moetrain-slurm-"))
    try:
        r = subprocess.run(["bash", str(UP), str(cluster)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(DOWN), str(cluster)], timeout=120)
        pytest.skip("Slurm cannot start here: tools/ci/slurm_up.sh took longer than 900 s (apt-get?)")
    if r.returncode != 0:
        subprocess.run(["bash", str(DOWN), str(cluster)], timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("slurm_up: cannot start")]
        if r.returncode == CANNOT_START and lines:
            pytest.skip(f"Slurm cannot start here: {lines[-1].removeprefix('slurm_up: cannot start: ')}")
        pytest.fail(f"tools/ci/slurm_up.sh exited {r.returncode}:\n{r.stderr[-3000:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    try:
        yield launch_env(SLURM_CONF=conf)
    finally:
        subprocess.run(["bash", str(DOWN), str(cluster)], timeout=120)
        shutil.rmtree(cluster, ignore_errors=True)


def sbatch_wait(args: list[str], env: dict, log: Path, timeout_s: float = 150) -> tuple[int, str]:
    """`sbatch --wait ARGS`; returns (exit code, job output). Cancels the job on timeout."""
    out = log.with_suffix(".out")
    cmd = ["sbatch", "--wait", "--output", str(out), *args]
    proc = start(cmd, log, env)
    try:
        (code,) = finish([proc], timeout_s)
    except AssertionError:
        m = re.search(r"Submitted batch job (\d+)", tail(log))
        if m:
            subprocess.run(["scancel", m.group(1)], env=env, timeout=30)
        raise AssertionError(f"sbatch --wait did not return in {timeout_s}s\n{tail(log)}\n{tail(out)}")
    return code, tail(log) + "\n--- job output:\n" + tail(out, 60)


def test_sbatch_two_tasks_then_resume(slurm_env, tmp_path):
    """2 tasks train 3 steps and checkpoint; a second submission of the same script (what a
    requeue runs) continues from that checkpoint, because the script passes resume=auto."""
    args = ["--ntasks", "2", "--nodes", "1", "launch/slurm.sbatch", "--config", "configs/tiny_cpu.yaml",
            *tiny_overrides(tmp_path), "checkpoint.every=3"]
    code, output = sbatch_wait(args, slurm_env, tmp_path / "sbatch1.log")
    assert code == 0, output
    assert "Slurm rendezvous localhost:" in output and "2 tasks" in output, output
    assert_trained(tmp_path / "runs" / "run", world=2)
    code, output = sbatch_wait(args + ["train.steps=5"], slurm_env, tmp_path / "sbatch2.log")
    assert code == 0, output
    assert "resumed from" in output and "step 3" in output, output
    assert_trained(tmp_path / "runs" / "run", world=2, steps=5)


def test_crashed_rank_ends_the_step(slurm_env, tmp_path):
    """srun -K: when one rank dies, the job ends at once instead of the others waiting in a
    collective (here: rank 0 waiting for rank 1 in the rendezvous, with a 60 s timeout)."""
    wrapper = tmp_path / "python_rank1_crashes.sh"
    wrapper.write_text(f'#!/bin/bash\nif [ "$SLURM_PROCID" = 1 ]; then echo "rank 1: simulated crash" >&2; '
                       f'exit 7; fi\nexec {slurm_env["PYTHON"]} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(slurm_env, PYTHON=str(wrapper))
    t0 = time.monotonic()
    code, output = sbatch_wait(["--ntasks", "2", "launch/slurm.sbatch", *tiny_overrides(tmp_path)],
                               env, tmp_path / "sbatch.log", timeout_s=120)
    elapsed = time.monotonic() - t0
    assert code != 0, output
    assert "simulated crash" in output, output
    assert elapsed < 45, f"job took {elapsed:.0f}s to end after a rank crashed\n{output}"


@pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))
def test_mpiexec_inside_allocation(slurm_env, tmp_path):
    """`mpiexec` in a batch script: every rank also sees the batch step's SLURM_PROCID=0 and
    SLURM_NTASKS=1; moetrain must take its rank from MPI, not Slurm."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -e\nbash launch/mpirun.sh -n 2 \"$@\"\n")
    code, output = sbatch_wait(["--ntasks", "1", str(script), *tiny_overrides(tmp_path)],
                               slurm_env, tmp_path / "sbatch.log")
    assert code == 0, output
    assert_trained(tmp_path / "runs" / "run", world=2)
