"""launch/torchrun.sh for real: single node (standalone) and two "nodes" on localhost (two
torchrun agents, --nnodes 2, c10d rendezvous on 127.0.0.1), each a 3-step tiny EP run."""
from __future__ import annotations

import pytest
from _launch import REPO, assert_trained, finish, free_port, launch_env, start, tail, tiny_overrides
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop


def test_two_node_torchrun_on_localhost(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # no --rdzv-id (the default: moetrain-<endpoint>) and --rdzv-conf: torchrun accepts both
    cmd = ["bash", str(REPO / "launch/torchrun.sh"), "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-endpoint", endpoint, "--max-restarts", "0",
           "--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=3",
           "--config", "configs/tiny_cpu.yaml", *tiny_overrides(tmp_path)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [start(cmd, log, launch_env()) for log in logs]
    codes = finish(procs, timeout_s=120)
    assert codes == [0, 0], "\n".join(f"--- node{i} (exit {c}):\n{tail(l)}" for i, (c, l) in enumerate(zip(codes, logs)))
    assert_trained(tmp_path / "runs" / "run", world=2)
    # exactly one agent's worker was global rank 0 (the writer)
    assert sum("moetrain: world 2" in log.read_text() for log in logs) == 1


def test_single_node_torchrun(tmp_path):
    log = tmp_path / "torchrun.log"
    cmd = ["bash", str(REPO / "launch/torchrun.sh"), "--nproc-per-node", "2", *tiny_overrides(tmp_path)]
    (code,) = finish([start(cmd, log, launch_env())], timeout_s=120)
    assert code == 0, tail(log)
    assert_trained(tmp_path / "runs" / "run", world=2)
