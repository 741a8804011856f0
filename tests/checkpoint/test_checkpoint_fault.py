"""Fault tolerance: under torchrun --max-restarts 1, rank 1 is SIGKILLed at step 12 (after the
step-10 checkpoint); torchrun restarts both ranks, they resume from step 10 with no manual step,
and the final losses equal the uninterrupted run's, bitwise."""
from __future__ import annotations

import subprocess
import sys

import ckpt_helpers as H
import pytest
from moetrain.checkpoint import store
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop


def test_killed_rank_restarts_and_finishes_identically(w2_straight, tmp_path):
    ref, _ = w2_straight
    marker = tmp_path / "killed_once"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5",
           H.FAULTY_MAIN, "--kill", f"rank=1,step=12,marker={marker}", "--config", "configs/tiny_cpu.yaml",
           *H.overrides(tmp_path / "runs", tmp_path / "ckpt", H.W2_EXTRA + ["checkpoint.resume=auto"])]
    # Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted workers share the agent's TCPStore
    # with the dead ones and gloo may read a dead peer's address (pytorch/pytorch#135712): about
    # half of the restarts then fail in init_process_group with "Connection refused".
    env = H.cli_env(MOETRAIN_DIST_TIMEOUT="30", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen(cmd, cwd=H.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    (code, out, _), = H.run_many([proc], timeout_s=240)
    assert code == 0, out[-4000:]
    assert marker.exists(), "the fault was never injected"
    assert "resumed from" in out and "step_00000010" in out, out[-4000:]
    got = H.losses(tmp_path / "runs")
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(1, 21)] == [ref[s] for s in range(1, 21)]      # bitwise
    assert [c.step for c in store.find_complete(str(tmp_path / "ckpt"))[0]] == [20, 15, 10, 5]
