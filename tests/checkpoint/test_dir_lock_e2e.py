"""End to end (after integrating moetrain/checkpoint/lock.py into Checkpointer): two training runs on
one checkpoint.dir, a SIGKILLed owner, and the refusal reaching every rank as one line."""
from __future__ import annotations

import json
import os
import signal
import time

import ckpt_helpers as H
import pytest
from _dist import run_dist
from moetrain.checkpoint import store
from moetrain.checkpoint.lock import LOCK_NAME, DirLock
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

RUN = ["train.steps=8", "checkpoint.every=2", "checkpoint.resume=auto"]


def _wait_for(proc, text: str, timeout_s: float = 120) -> str:
    """Read proc's stdout until a line containing text (the run is past that point)."""
    seen, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited before {text!r}: {''.join(seen)}{proc.stderr.read()[-3000:]}")
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {timeout_s}s")


def test_a_second_run_on_a_busy_checkpoint_dir_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    a = H.start_cli(H.overrides(tmp_path / "a", ckpt, RUN))
    _wait_for(a, "moetrain: world 1")          # printed after resume(): A holds the lock
    os.kill(a.pid, signal.SIGSTOP)             # keep A mid-run, deterministically (no heartbeat either)
    try:
        (code, out, err), = H.run_many([H.start_cli(H.overrides(tmp_path / "b", ckpt, RUN))])
    finally:
        os.kill(a.pid, signal.SIGCONT)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert sum(ln.startswith("moetrain: error") for ln in lines) == 1, err
    assert lines[-1].startswith(f"moetrain: error: checkpoint.dir {ckpt} is in use by another run: "
                                f"{ckpt / LOCK_NAME} is held by pid {a.pid} on host "), lines[-1]
    (code, _, err), = H.run_many([a])
    assert code == 0, err[-3000:]
    steps = store.find_complete(str(ckpt))[0]
    assert [c.step for c in steps] == [8, 6, 4, 2][:len(steps)]
    assert all(c.manifest["config"]["logging"]["dir"] == str(tmp_path / "a") for c in steps), "all A's"
    assert not (ckpt / LOCK_NAME).exists() and not [n for n in os.listdir(ckpt) if n.startswith(".")]
    # afterwards the directory is free: B resumes from A's newest checkpoint
    (code, out, err), = H.run_many([H.start_cli(H.overrides(tmp_path / "b", ckpt, ["train.steps=10"] + RUN[1:]))])
    assert code == 0 and "resumed from" in out and "step_00000008" in out, err[-3000:]


def test_a_killed_owner_is_taken_over_with_a_warning(tmp_path):
    ckpt = tmp_path / "ckpt"
    (code, _, err), = H.run_many([H.start_cli(H.overrides(tmp_path / "a", ckpt, RUN), fault=("--kill", "rank=0,step=4"))])
    assert code == -signal.SIGKILL, err[-3000:]
    dead = json.loads((ckpt / LOCK_NAME).read_text())["pid"]
    (code, out, err), = H.run_many([H.start_cli(H.overrides(tmp_path / "a", ckpt, RUN))])
    assert code == 0, err[-3000:]
    assert f"moetrain: warning: taking over the lock {ckpt / LOCK_NAME} held by pid {dead} on host " in out, out
    assert f"its process {dead} on this machine is gone" in out
    assert "resumed from" in out and "step_00000004" in out, out
    assert not (ckpt / LOCK_NAME).exists()


def test_the_refusal_reaches_every_rank_as_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    with DirLock(str(ckpt)):                      # held by this (live) process
        errors = run_dist(H.try_resume, 2, (str(ckpt), "auto", ["parallel.ep=2", "checkpoint.every=2"]))
    assert errors[0] == errors[1] and "\n" not in errors[0], errors
    assert errors[0].startswith(f"checkpoint.dir {ckpt} is in use by another run: ") and f"pid {os.getpid()} " in errors[0]
    assert os.listdir(ckpt) == []                 # released by us; nothing left by the refused ranks
