"""Elastic expert parallelism under torchrun (issue 21): two "nodes" (two torchrun agents, --nnodes
1:2, c10d rendezvous on localhost, 2 ranks each), parallel.ep=auto, dropless. One agent and its
workers are killed with SIGKILL mid-run: the other continues at world 2 with ep 2 from the last
disk checkpoint or in-memory snapshot (checkpoint.resume=auto, experts by global id). Every step's
loss equals an uninterrupted world-4 run's to the cross-layout tolerance.

With in-memory snapshots (checkpoint.snapshot_every=1, no disk checkpoints at all) one worker of
node a is killed first: both agents restart the group of 4 from the snapshots. Then node b is
killed, its snapshot memory deleted with it, and the survivors resume from node a's copies of the step before the
failure; then node b's agent is started again and the job grows back to world 4 with ep 4: the
agents stop the world-2 workers with SIGTERM, which snapshot the step they stopped at, and the
new group of 4 resumes from it (node b, which lost its memory, gets its files from node a)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from _launch import REPO, finish, free_port, launch_env, start, tail

pytestmark = pytest.mark.slow

STEPS = 40
CFG = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
       "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null", "train.seq_len=32",
       "train.global_batch_size=8", "train.micro_batch_size=2", f"train.steps={STEPS}", "train.warmup_steps=2",
       "train.lr=3e-3", "train.eval_every=0", "logging.tensorboard=false", "logging.every=1",
       "train.progress=false", "train.num_threads=1", "train.device=cpu", "parallel.ep=auto",
       "checkpoint.resume=auto", "checkpoint.keep_last=3"]


# a dead node leaves the rendezvous after 3 missed 1-s heartbeats (torch's default: 3 x 5 s, which
# was 16 of the 20 s from the kill to the first world-2 step)
RDZV_CONF = "last_call_timeout=3,join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=3"


def _overrides(tmp: Path, name: str) -> list[str]:
    return CFG + [f"logging.dir={tmp / 'runs'}", f"logging.run_name={name}", f"checkpoint.dir={tmp / ('ck_' + name)}"]


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:       # a line being written
            pass
    return [r for r in out if "loss" in r]


def _wait(cond, timeout_s: float, what: str, logs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(f"--- {p}:\n{tail(p, 60)}" for p in logs))


def _tree(pid: int) -> list[int]:
    """pid and every descendant (torchrun starts its workers in sessions of their own, so killing
    the agent's process group would leave them running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _world(rec: dict) -> int:
    return len(rec.get("ranks.step_ms", []))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Every step's loss of the uninterrupted world-4 run (ep 4)."""
    tmp = tmp_path_factory.mktemp("ref")
    ref_log = tmp / "ref.log"
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                          "-m", "moetrain.train", *_overrides(tmp, "ref")], cwd=REPO, env=launch_env(),
                         stdout=open(ref_log, "wb"), stderr=subprocess.STDOUT, timeout=300)
    assert ref.returncode == 0, tail(ref_log)
    want = {r["step"]: r["loss"] for r in _records(tmp / "runs" / "ref" / "metrics.jsonl")}
    assert sorted(want) == list(range(1, STEPS + 1))
    return want


def _kill_tree(p: subprocess.Popen) -> None:
    for pid in _tree(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("mode", ["disk", "snapshot"])
def test_shrink_under_torchrun(tmp_path, mode, reference):
    """disk: checkpoints every 2 steps; shrinks to world 2 and finishes there. snapshot: no disk
    checkpoints, an in-memory snapshot every step (node b's snapshot directory is deleted with the
    node: only node a's replicas remain); shrinks, then grows back to world 4 when node b returns."""
    keep = ["checkpoint.every=2"] if mode == "disk" else [
        "checkpoint.every=0", "checkpoint.snapshot_every=1", f"checkpoint.snapshot_dir={tmp_path / 'shm'}"]
    want = reference
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "2",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", uuid.uuid4().hex[:8],
             "--max_restarts", "6", "--rdzv_conf", RDZV_CONF,
             "-m", "moetrain.train", *_overrides(tmp_path, "el"), *keep]
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "b2.log"]
    metrics = tmp_path / "runs" / "el" / "metrics.jsonl"
    # each worker group gets a fresh store hosted by its rank 0 (launch/torchrun.sh sets this too):
    # torch's shared agent store keeps the previous group's keys and, on a scale-up, does not
    # publish the new round's MASTER_ADDR (the grow-back hung without it)
    env = dict(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    a = start(agent, logs[0], launch_env(MOETRAIN_NODE="a", **env))
    # agent a hosts the rendezvous store (the first to bind the endpoint): node b may then die
    _wait(lambda: _listening(port), 60, "agent a's rendezvous store", logs[:1])
    b = start(agent, logs[1], launch_env(MOETRAIN_NODE="b", **env))
    procs = [a, b]
    grow_s = None
    rng = random.Random()              # the kills come at random steps (printed)
    kill_at = rng.randint(4, 9)
    try:
        if mode == "snapshot":     # first one worker of node a dies: the group of 4 restarts from the snapshots
            worker_kill_at = rng.randint(2, 3)
            _wait(lambda: any(r["step"] >= worker_kill_at for r in _records(metrics)), 180,
                  f"{worker_kill_at} steps at world 4", logs[:2])
            worker_killed_after = max(r["step"] for r in _records(metrics))
            t_wk = time.monotonic()
            os.kill(_tree(a.pid)[-1], signal.SIGKILL)
            _wait(lambda: "resumed from the in-memory snapshot" in logs[0].read_text(), 120,
                  "a restart from the snapshot after a worker was killed", logs[:2])
            _wait(lambda: any(r["step"] > worker_killed_after for r in _records(metrics)), 120,
                  "the step after the worker kill", logs[:2])
            restart_s = time.monotonic() - t_wk
            kill_at = worker_killed_after + rng.randint(3, 5)
        _wait(lambda: any(r["step"] >= kill_at and _world(r) == 4 for r in _records(metrics)), 180,
              f"{kill_at} steps at world 4", logs[:2])
        killed_after = max(r["step"] for r in _records(metrics))
        t_kill = time.monotonic()
        _kill_tree(b)
        b.wait()
        shutil.rmtree(tmp_path / "shm" / f"uid{os.getuid()}" / "el" / "b", ignore_errors=True)   # node b's memory is gone
        first2 = _wait(lambda: next((r for r in _records(metrics) if _world(r) == 2), None), 240,
                       "a step at world 2 after the kill", logs[:1])
        shrink_s = time.monotonic() - t_kill
        if mode == "snapshot":        # node b comes back (a fresh machine: no snapshot memory)
            seen = len(_records(metrics))
            t_join = time.monotonic()
            procs.append(start(agent, logs[2], launch_env(MOETRAIN_NODE="b", **env)))
            _wait(lambda: any(_world(r) == 4 for r in _records(metrics)[seen:]), 240,
                  "a step at world 4 after node b rejoined", logs)
            grow_s = time.monotonic() - t_join
        codes = finish([a] + procs[2:], timeout_s=300)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    assert codes == [0] * len(codes), "\n".join(f"--- {p}:\n{tail(p, 60)}" for p in logs)
    recs = _records(metrics)
    got = {}
    for r in recs:                       # a step redone after a resume: the last record wins
        got[r["step"]] = r["loss"]
    assert sorted(got) == list(range(1, STEPS + 1))
    steps = sorted(got)
    torch.testing.assert_close(torch.tensor([got[s] for s in steps], dtype=torch.float64),
                               torch.tensor([want[s] for s in steps], dtype=torch.float64), rtol=2e-5, atol=0)
    worlds = [w for i, w in enumerate(_world(r) for r in recs) if i == 0 or w != _world(recs[i - 1])]
    assert worlds == ([4, 2, 4] if mode == "snapshot" else [4, 2]), worlds
    text = logs[0].read_text()
    assert "parallel.ep=auto: ep 2 at world 2" in text
    lost = killed_after - (first2["step"] - 1)
    print(f"\nelastic ({mode}): killed after step {killed_after}, resumed at world 2 from step {first2['step'] - 1} "
          f"({lost} steps redone), first world-2 step {shrink_s:.1f}s after the kill")
    assert 0 <= lost <= (2 if mode == "disk" else 1) + 1      # the save interval (+ the step in flight)
    if mode == "snapshot":
        # three starts from a snapshot: after the worker kill (world 4), the node kill (world 2), the grow (world 4)
        resumed = [line.split(" at step ")[1] for line in text.splitlines()
                   if line.startswith("moetrain: resumed from the in-memory snapshot")]
        starts = [line.split(" (")[0] for line in text.splitlines() if line.startswith("moetrain: world ")]
        assert len(resumed) == 3 and starts == ["moetrain: world " + w for w in "4424"], (resumed, starts)
        assert resumed[0].endswith("(saved at world 4: dp 4 tp 1 ep 4)"), resumed
        print(f"worker kill: killed after step {worker_killed_after}, the group of 4 resumed at step "
              f"{resumed[0].split()[0]}; step {worker_killed_after + 1} done {restart_s:.1f}s after the kill")
        snaps = [r for r in recs if "snapshot_ms" in r]
        print(f"snapshots: {len(snaps)} logged, median {sorted(r['snapshot_ms'] for r in snaps)[len(snaps) // 2]:.1f} ms, "
              f"{max(r['snapshot_mb'] for r in snaps):.3f} MiB per rank (own + replica sent)")
        # the world-2 workers were stopped by SIGTERM, snapshotted the step they stopped at, and the
        # group of 4 (ep 4) resumed from exactly that step: nothing redone
        stopped = [int(line.split(" at step ")[1].split(":")[0]) for line in text.splitlines()
                   if "preempted by SIGTERM at step" in line]
        assert len(stopped) == 1 and f"snapshot of step {stopped[0]} resumes it" in text, tail(logs[0], 80)
        last2 = max(i for i, r in enumerate(recs) if _world(r) == 2)
        first4 = recs[last2 + 1]
        assert recs[last2]["step"] == stopped[0] and first4["step"] == stopped[0] + 1, (recs[last2], first4)
        assert text.count("parallel.ep=auto: ep 4 at world 4") == 3      # rank 0 (node a) says so at each start
        print(f"grow: node b rejoined, world 4 from step {stopped[0]} (0 steps redone), first world-4 step "
              f"{grow_s:.1f}s after its agent started")
