"""moetrain/checkpoint/lock.py: one run per checkpoint.dir. Racing processes, a SIGKILLed owner, stale
and fresh heartbeats from another host, release of our own lock only, garbage lock files."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moetrain.checkpoint import lock as L
from moetrain.checkpoint.lock import CheckpointLockError, DirLock

REPO = Path(__file__).resolve().parents[2]
HOLDER = Path(__file__).with_name("_lock_holder.py")
JOB_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_RESTART_COUNT", L.STALE_ENV)


@pytest.fixture(autouse=True)
def _no_job_env(monkeypatch):
    for name in JOB_VARS:
        monkeypatch.delenv(name, raising=False)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    env["PYTHONPATH"] = str(REPO)
    return env


def _holder(root) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(HOLDER), str(root), "300"], env=_env(), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == "READY", p.stderr.read()
    return p


def _foreign(root, age: float = 0.0, raw: bytes | None = None, **fields) -> Path:
    """A lock as another host's run would leave it, last touched `age` seconds ago."""
    root.mkdir(parents=True, exist_ok=True)
    info = dict(moetrain_lock=1, token="f" * 16, host="elsewhere.example", boot_id="b", pid_ns="p", pid=4242,
                pid_start="1", job="slurm 777.0", attempt=[0, 0], user="alice", started="2024-05-01T10:00:00+0000")
    info.update(fields)
    path = root / L.LOCK_NAME
    path.write_bytes(raw if raw is not None else json.dumps(info).encode())
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def _token(root) -> str | None:
    return json.loads((root / L.LOCK_NAME).read_text()).get("token")


def _one_line(exc) -> str:
    msg = str(exc.value if hasattr(exc, "value") else exc)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.mark.slow
@pytest.mark.parametrize("stale_present", [False, True], ids=["free", "stale"])
def test_two_processes_at_once_exactly_one_wins(tmp_path, stale_present):
    """Started together, on a free directory or one holding a stale lock both take over: one wins,
    the other is refused in one line naming the winner, the lock path and the winner's start."""
    for trial in range(4):
        root = tmp_path / f"t{trial}"
        if stale_present:
            _foreign(root, age=1000)
        procs = [_holder(root), _holder(root)]
        for p in procs:
            p.stdin.write("go\n")
        for p in procs:
            p.stdin.flush()
        lines = [p.stdout.readline().strip() for p in procs]
        won = [i for i, ln in enumerate(lines) if ln.startswith("WON")]
        assert len(won) == 1, lines
        winner, loser = procs[won[0]], procs[1 - won[0]]
        refusal = lines[1 - won[0]]
        assert refusal.startswith("REFUSED checkpoint.dir ") and loser.wait(10) == 3, refusal
        for part in (f"pid {winner.pid} ", f"on host {socket.gethostname()} ", str(root / L.LOCK_NAME),
                     "started 20", "job -", "last heartbeat"):
            assert part in refusal, (part, refusal)
        if not stale_present:      # (with one, the loser may have been the one that broke it)
            assert "taking over" not in lines[won[0]], lines[won[0]]
        out, err = winner.communicate("", timeout=10)
        assert out.strip() == "RELEASED True" and winner.returncode == 0, err
        assert os.listdir(root) == [], "no lock, tmp, aside or break-marker file is left"


def test_sigkilled_owner_is_taken_over_with_a_warning(tmp_path):
    p = _holder(tmp_path)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().startswith(f"WON {p.pid}")
    with pytest.raises(CheckpointLockError, match=f"pid {p.pid} "):
        DirLock(str(tmp_path)).acquire()            # alive: refused, whatever the stale time
    os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.2)                                  # not reaped yet: a zombie counts as gone
    lock = DirLock(str(tmp_path))                    # default stale time (300 s): no waiting
    warning = lock.acquire()
    assert warning and f"held by pid {p.pid} on host" in warning and "is gone" in warning, warning
    p.wait(10)
    assert lock.release() and os.listdir(tmp_path) == []


def test_another_hosts_lock_fresh_is_refused_stale_is_taken_over(tmp_path):
    path = _foreign(tmp_path, age=5)
    with pytest.raises(CheckpointLockError) as exc:
        DirLock(str(tmp_path), stale_s=300).acquire()
    msg = _one_line(exc)
    for part in ("is in use by another run", str(path), "pid 4242 on host elsewhere.example", "job slurm 777.0",
                 "user alice", "started 2024-05-01T10:00:00+0000", "last heartbeat 5s ago"):
        assert part in msg, (part, msg)
    assert _token(tmp_path) == "f" * 16, "a refused taker changes nothing"
    _foreign(tmp_path, age=400)
    lock = DirLock(str(tmp_path), stale_s=300)
    warning = lock.acquire()
    assert "lock held by pid 4242 on host elsewhere.example" in warning
    assert "no heartbeat for 400s (stale after 300s)" in warning
    assert _token(tmp_path) == lock.token
    lock.release()


def test_stale_time_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(L.STALE_ENV, "5")
    assert (DirLock(str(tmp_path)).stale_s, DirLock(str(tmp_path)).heartbeat_s) == (5.0, 1.25)
    _foreign(tmp_path, age=2)
    with pytest.raises(CheckpointLockError, match="after 5s without heartbeat"):
        DirLock(str(tmp_path)).acquire()
    _foreign(tmp_path, age=10)
    lock = DirLock(str(tmp_path))
    assert "no heartbeat for 10s" in lock.acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = DirLock(str(tmp_path), stale_s=5, heartbeat_s=0.1)
    lock.acquire()
    path = tmp_path / L.LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.time() + 5
    while time.time() - path.stat().st_mtime > 50 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 5, "the heartbeat touched the lock"
    lock.release()


def test_release_removes_only_our_own_lock(tmp_path):
    _foreign(tmp_path)
    assert DirLock(str(tmp_path)).release() is False     # never held: nothing removed
    assert _token(tmp_path) == "f" * 16

    other = tmp_path / "b"
    old = DirLock(str(other), stale_s=5, heartbeat_s=60)
    old.acquire()
    # the old owner looks stale from here (as if on another host, silent for 100 s): taken over
    info = json.loads((other / L.LOCK_NAME).read_text())
    _foreign(other, age=100, **dict(info, host="elsewhere.example"))
    new = DirLock(str(other), stale_s=5)
    assert "no heartbeat for 100s" in new.acquire()
    assert old.release() is False and _token(other) == new.token, "the old owner leaves the new lock alone"
    with pytest.raises(CheckpointLockError, match="lost the lock"):
        old.check()
    new.check()
    assert new.release() is True and os.listdir(other) == []


def test_heartbeat_notices_a_lost_lock(tmp_path):
    lock = DirLock(str(tmp_path), stale_s=5, heartbeat_s=0.05)
    lock.acquire()
    _foreign(tmp_path)                                   # someone replaced it
    deadline = time.time() + 5
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost and "another owner" in lock.lost
    with pytest.raises(CheckpointLockError) as exc:
        lock.check()
    assert "now held by pid 4242 on host elsewhere.example" in _one_line(exc)
    assert lock.release() is False and _token(tmp_path) == "f" * 16


@pytest.mark.parametrize("raw", [b"\x00\x01 not json", b"", b"[1, 2]", b'{"pid": 1}'],
                         ids=["binary", "empty", "list", "no-token"])
def test_garbage_is_refused_while_fresh_and_taken_over_when_old(tmp_path, raw):
    """Refused while it changed recently (a creator without hard links may be between create and
    write), taken over once unchanged for the stale time (nobody heartbeats it)."""
    path = _foreign(tmp_path, age=1, raw=raw)
    with pytest.raises(CheckpointLockError) as exc:
        DirLock(str(tmp_path), stale_s=5).acquire()
    msg = _one_line(exc)
    assert f"is locked by {path}, which is not a readable moetrain lock" in msg and "delete it" in msg, msg
    _foreign(tmp_path, age=10, raw=raw)
    lock = DirLock(str(tmp_path), stale_s=5)
    assert f"taking over the lock {path}: it is not a moetrain lock and unchanged for 10s" == lock.acquire()
    lock.release()


def test_same_process_releases_and_takes_again_but_never_twice(tmp_path):
    a, b = DirLock(str(tmp_path)), DirLock(str(tmp_path))
    for _ in range(3):
        assert a.acquire() is None
        with pytest.raises(CheckpointLockError, match=f"pid {os.getpid()} "):
            b.acquire()                                  # no reentrancy, even in one process
        assert a.release() is True and a.release() is False
    with b:
        assert _token(tmp_path) == b.token
    assert os.listdir(tmp_path) == []


def test_a_dropped_lock_object_releases(tmp_path):
    DirLock(str(tmp_path)).acquire()                     # garbage at once (CPython): released
    DirLock(str(tmp_path)).release()
    assert os.listdir(tmp_path) == []


def test_many_racers_on_one_stale_lock_one_wins(tmp_path):
    for trial in range(5):
        root = tmp_path / f"t{trial}"
        _foreign(root, age=100)
        locks = [DirLock(str(root), stale_s=5) for _ in range(8)]
        results = [None] * len(locks)
        barrier = threading.Barrier(len(locks))

        def take(i):
            barrier.wait()
            try:
                results[i] = locks[i].acquire() or "won"
            except CheckpointLockError as exc:
                results[i] = exc

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [i for i, r in enumerate(results) if isinstance(r, str)]
        assert len(winners) == 1, results
        assert _token(root) == locks[winners[0]].token
        assert all(f"pid {os.getpid()} " in str(r) or "keeps changing hands" in str(r)
                   for i, r in enumerate(results) if i not in winners), results
        assert locks[winners[0]].release() and os.listdir(root) == []


def test_without_hard_links_o_excl_is_used(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(L.os, "link", no_link)
    a = DirLock(str(tmp_path))
    a.acquire()
    with pytest.raises(CheckpointLockError, match="in use by another run"):
        DirLock(str(tmp_path)).acquire()
    assert a.release() and os.listdir(tmp_path) == []


def test_an_earlier_attempt_of_the_same_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _foreign(tmp_path, job="torchelastic abc", attempt=[0, 0])       # the attempt before: stopped
    lock = DirLock(str(tmp_path))
    assert "it is an earlier attempt of this job (torchelastic abc)" in lock.acquire()
    assert json.loads((tmp_path / L.LOCK_NAME).read_text())["attempt"] == [0, 1]
    lock.release()


def test_a_reused_pid_on_this_machine_is_stale(tmp_path):
    host, boot, pidns = L._machine()
    here = dict(host=host, boot_id=boot, pid_ns=pidns)
    _foreign(tmp_path, pid=os.getpid(), pid_start="1", **here)        # our pid, another start time
    lock = DirLock(str(tmp_path))
    assert f"pid {os.getpid()} on this machine is now another process" in lock.acquire()
    lock.release()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign(tmp_path, pid=int(done.stdout), **here)                  # an exited process
    assert "on this machine is gone" in lock.acquire()
    lock.release()


def test_file_system_errors_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointLockError, match=r"^cannot lock checkpoint.dir .*afile: FileExistsError") as exc:
        DirLock(str(tmp_path / "afile")).acquire()
    _one_line(exc)


def test_this_jobs_owner_on_another_host_is_stale_once_it_stops_heartbeating(tmp_path, monkeypatch):
    """An elastic restart after the node of rank 0 was lost: the lock's owner is this job (any
    restart count: a rejoined agent counts from 0) on another host. It is waited for: taken over
    after 4 heartbeat periods without heartbeat, refused while it heartbeats."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    _foreign(tmp_path, job="torchelastic abc", attempt=[0, 3])       # fresh, then silent
    lock = DirLock(str(tmp_path), heartbeat_s=0.1)
    t0 = time.monotonic()
    warning = lock.acquire()
    assert 0.3 < time.monotonic() - t0 < 5
    assert "an earlier worker group of this job (torchelastic abc) on another host" in warning
    lock.release()
    path = _foreign(tmp_path, job="torchelastic abc", attempt=[0, 3])
    stop = threading.Event()

    def beat():                       # the owner is alive elsewhere: its heartbeat goes on
        while not stop.wait(0.05):
            os.utime(path, None)
    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        with pytest.raises(CheckpointLockError, match="in use by another run"):
            DirLock(str(tmp_path), heartbeat_s=0.1).acquire()
    finally:
        stop.set()
        t.join()
    _foreign(tmp_path, job="torchelastic other", attempt=[0, 3])     # another job: the 300 s rule
    with pytest.raises(CheckpointLockError, match="in use by another run"):
        DirLock(str(tmp_path), heartbeat_s=0.1).acquire()
