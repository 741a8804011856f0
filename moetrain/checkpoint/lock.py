"""One run per checkpoint.dir: a lock file taken before any cleanup, resume decision or save.

Why no flock/fcntl: on the shared file systems clusters use they are often missing or node-local
(NFS mounted `nolock`/`local_lock`, NFSv3 needing lockd, Lustre's default `noflock` -> ENOSYS or
`localflock` -> this node only), and fcntl locks vanish when the process closes any descriptor of
the file. So the lock is a name in the directory itself, made by operations that are atomic on
local file systems, NFSv3+, Lustre and GPFS:

- <dir>/.moetrain.lock holds one JSON object: owner host, pid and its start time, boot id, pid
  namespace, job (Slurm job.step or torchelastic run id) and attempt, user, start time, random
  token. It is written to a unique file beside it, fsynced, then hard-linked to the lock name
  (link(2): one RPC, the server refuses an existing name; what open(2) recommends for NFS). A
  retransmitted LINK whose first reply was lost says EEXIST although it worked: the unique file's
  link count (2) tells. Without hard links: O_CREAT|O_EXCL. Readers see no lock or a whole one.
- Heartbeat: a daemon thread of the owner touches the lock's mtime every heartbeat_s (5 s),
  after checking the token is still its own (else the loss is recorded; check() raises it).
  Ages are "mtime of a file we just created" minus "the lock's mtime", never the local clock: on
  NFS both are the server's stamps (utime(path, None) sets server time), so skew between hosts
  never enters; Lustre/GPFS clients stamp with their own NTP-synced clocks, far within stale_s
  (the same-job rule below, 20 s, assumes NTP keeps them within a few seconds).
  open()+fstat (close-to-open) revalidates NFS's attribute cache.

Stale, taken over with a warning line: (1) the owner ran on this machine (same host name, boot id
and pid namespace) and its pid is gone, a zombie, or another process (start time differs): at
once, e.g. a SIGKILLed or os._exit()ed run; (2) the owner is an earlier attempt of this job
(same job, lower Slurm/torchelastic restart count: the launcher stopped it before restarting);
(3) an owner on another host from this same job (an elastic restart after the node of rank 0
was lost: torchelastic stops one worker group before it starts the next, and the restart counts
of agents that joined at different times do not compare): no heartbeat for 4 heartbeat periods
(20 s); the new owner waits that long rather than refusing; (4) no heartbeat for stale_s (300 s;
argument or MOETRAIN_CKPT_LOCK_STALE_S), the only evidence from another host. An owner visibly
alive on this machine is live whatever its heartbeat.
Garbage (not our JSON, e.g. empty) is refused while fresh, since an O_EXCL creator may be between
create and write, and taken over once unchanged for stale_s: nobody heartbeats it.

Takeover: the breaker first creates <lock>.break-<hash of the stale lock's inode and bytes> with
O_CREAT|O_EXCL: of racers judging the same stale lock only one may break it, and the marker stays
until the new owner releases, so a late racer cannot break the new lock. The winner renames the
stale lock aside, checks it moved what it judged (else puts it back by link, never over a newer
lock), then creates its own like anyone: of concurrent creators exactly one link succeeds.
Release renames the lock aside the same way and removes it only if the token is ours; it runs on
release(), when the DirLock is garbage collected, and at interpreter exit (weakref.finalize).
SIGKILL, os._exit and an unhandled SIGTERM leave the lock: the stale rules above. A live lock is
refused with one CheckpointLockError line naming owner, job, user, start, heartbeat age and path.
"""
from __future__ import annotations

import errno
import getpass
import glob
import hashlib
import json
import os
import secrets
import socket
import threading
import time
import weakref
from typing import NamedTuple, Optional

LOCK_NAME = ".moetrain.lock"
STALE_ENV = "MOETRAIN_CKPT_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


class CheckpointLockError(RuntimeError):
    """One line: checkpoint.dir is in use by another run (owner and lock path named)."""


class _Seen(NamedTuple):
    raw: bytes
    st: os.stat_result
    info: Optional[dict]      # None: not a moetrain lock (garbage)


class DirLock:
    """lock = DirLock(dir); warning = lock.acquire(); ...; lock.check(); ...; lock.release()."""

    def __init__(self, root: str, stale_s: Optional[float] = None, heartbeat_s: Optional[float] = None):
        self.root = root
        self.path = os.path.join(root, LOCK_NAME)
        self.stale_s = float(stale_s if stale_s is not None else os.environ.get(STALE_ENV) or DEFAULT_STALE_S)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else min(5.0, self.stale_s / 4))
        # an owner elsewhere from this same job is stale after this long without heartbeat
        self.same_job_stale_s = min(self.stale_s, 4 * self.heartbeat_s)
        self.token: Optional[str] = None
        self._state: dict = {}
        self._finalizer = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> Optional[str]:
        """Take the lock, or raise CheckpointLockError (one line). Returns the warning line when a
        stale lock was taken over, else None."""
        if self.token:
            raise RuntimeError(f"{self.path} is already held by this DirLock")
        token = secrets.token_hex(8)
        tmp = f"{self.path}.{token}.tmp"
        try:
            os.makedirs(self.root, exist_ok=True)
            return self._take(token, tmp, _write_new(tmp, _owner_record(token)))
        except OSError as exc:
            raise CheckpointLockError(f"cannot lock checkpoint.dir {self.root}: {type(exc).__name__}: "
                                      f"{exc}".replace("\n", " ")) from None
        finally:
            _unlink(tmp)

    def _take(self, token: str, tmp: str, now: float) -> Optional[str]:
        warning = None
        # an owner from this job on another host: wait until it is live for sure (it heartbeats) or
        # stale (a previous worker group on a lost node)
        wait_until = time.monotonic() + self.same_job_stale_s + 2 * self.heartbeat_s
        attempt = 0
        while attempt < 10:
            if _link_or_excl(tmp, self.path):
                self._start(token)
                return warning
            seen = _read(self.path)
            if seen is None:
                attempt += 1
                continue                          # released meanwhile: try again
            reason = self._stale_reason(seen, now)
            if reason is None and self._same_job_elsewhere(seen) and time.monotonic() < wait_until:
                time.sleep(min(1.0, self.heartbeat_s))
                os.utime(tmp, None)               # the file system's "now" again
                now = os.stat(tmp).st_mtime
                continue
            if reason is None:
                raise CheckpointLockError(self._refusal(seen, now))
            attempt += 1
            if self._break(seen, now):
                held = f" held{_who(seen.info)}" if seen.info else ""
                warning = f"taking over the lock {self.path}{held}: {reason}"
            time.sleep(0.01 * attempt)
        raise CheckpointLockError(f"checkpoint.dir {self.root}: its lock {self.path} keeps changing hands "
                                  "(several runs starting there at once?)")

    def check(self) -> None:
        """Raise CheckpointLockError unless the lock is still ours (e.g. before committing a save)."""
        seen = _read(self.path)
        if self.token is None or seen is None or (seen.info or {}).get("token") != self.token:
            now = "gone" if seen is None else f"held{_who(seen.info)}" if seen.info else "not a moetrain lock"
            raise CheckpointLockError(f"lost the lock on checkpoint.dir {self.root}: {self.path} is now {now} "
                                      "(another run took it over as stale); stopping so that two runs never "
                                      "write there")

    def release(self) -> bool:
        """Stop the heartbeat; remove the lock if it is still ours. True when it was removed."""
        fin, self._finalizer, self.token = self._finalizer, None, None
        return bool(fin()) if fin is not None else False

    @property
    def lost(self) -> Optional[str]:
        """Set by the heartbeat when it found the lock no longer ours."""
        return self._state.get("lost")

    def _start(self, token: str) -> None:
        self.token, self._state = token, {}
        stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(self.path, token, self.heartbeat_s, stop, self._state),
                         name="moetrain-ckpt-lock", daemon=True).start()
        # released on release(), garbage collection of this object, or interpreter exit
        self._finalizer = weakref.finalize(self, _release, self.path, token, stop, os.getpid())

    def _stale_reason(self, seen: _Seen, now: float) -> Optional[str]:
        """Why the lock seen is stale, or None when it is live."""
        age, info = now - seen.st.st_mtime, seen.info
        if info is None:
            return f"it is not a moetrain lock and unchanged for {age:.0f}s" if age > self.stale_s else None
        local = _local_verdict(info)
        if local is not None:
            return local or None                  # "": alive on this machine
        job, attempt = _job()
        if job and info.get("job") == job and _earlier(info.get("attempt"), attempt):
            return f"it is an earlier attempt of this job ({job})"
        if self._same_job_elsewhere(seen) and age > self.same_job_stale_s:
            return (f"it is an earlier worker group of this job ({job}) on another host, without heartbeat for "
                    f"{age:.0f}s (a lost node)")
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f}s (stale after {self.stale_s:.0f}s)"
        return None

    @staticmethod
    def _same_job_elsewhere(seen: _Seen) -> bool:
        job = _job()[0]
        return bool(job) and seen.info is not None and seen.info.get("job") == job \
            and _local_verdict(seen.info) is None

    def _break(self, seen: _Seen, now: float) -> bool:
        """Remove the stale lock `seen` if we win the right to; True when we removed it."""
        marker = f"{self.path}.break-{hashlib.sha1(str(seen.st.st_ino).encode() + seen.raw).hexdigest()[:16]}"
        try:
            _write_new(marker, _owner_record(""))   # O_EXCL, not a link to tmp (its link count tells)
        except FileExistsError:
            old = _read(marker)
            if old is not None and now - old.st.st_mtime > self.stale_s:
                _unlink(marker)                   # a breaker that died mid-break
            return False
        return _remove_if(self.path, lambda moved: moved.st.st_ino == seen.st.st_ino and moved.raw == seen.raw)

    def _refusal(self, seen: _Seen, now: float) -> str:
        age = now - seen.st.st_mtime
        if seen.info is None:
            return (f"checkpoint.dir {self.root} is locked by {self.path}, which is not a readable moetrain "
                    f"lock (changed {age:.0f}s ago): it is taken over once unchanged for {self.stale_s:.0f}s; "
                    "delete it if no run uses this directory")
        return (f"checkpoint.dir {self.root} is in use by another run: {self.path} is held{_who(seen.info)}, "
                f"last heartbeat {age:.0f}s ago; stop that run or choose another checkpoint.dir (a lock is "
                f"taken over once its owner is gone: at once on its host, after {self.stale_s:.0f}s "
                f"without heartbeat elsewhere, {self.same_job_stale_s:.0f}s for this same job)").replace("\n", " ")


# ----------------------------------------------------------------------------- file operations


def _write_new(path: str, record: dict) -> float:
    """Create `path` (O_EXCL) with `record`, fsynced; return its mtime: the file system's 'now'."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def _link_or_excl(src: str, dst: str) -> bool:
    """Atomically make dst with src's content unless dst exists. True when we made it."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return os.stat(src).st_nlink == 2         # NFS: a retried LINK whose first reply was lost
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    with open(src, "rb") as f:
        data = f.read()
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read(path: str) -> Optional[_Seen]:
    """The lock file as it is now, or None when there is none (or it was just replaced: ESTALE)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            st, raw = os.fstat(fd), os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            return None
        raise
    try:
        info = json.loads(raw.decode())
    except ValueError:
        info = None
    return _Seen(raw, st, info if isinstance(info, dict) and isinstance(info.get("token"), str) else None)


def _remove_if(path: str, ok) -> bool:
    """Rename path aside; delete it if ok(what moved), else put it back (never over a newer one)."""
    aside = f"{path}.{secrets.token_hex(8)}.aside"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read(aside)
    good = moved is not None and ok(moved)
    if not good:
        _link_or_excl(aside, path)
    _unlink(aside)
    return good


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _heartbeat(path: str, token: str, every: float, stop: threading.Event, state: dict) -> None:
    while not stop.wait(every):
        try:
            seen = _read(path)
            if seen is None or (seen.info or {}).get("token") != token:
                state["lost"] = f"found {'no lock' if seen is None else 'another owner'} at a heartbeat"
                return
            os.utime(path)                       # NFS: set to the server's time
        except OSError:
            continue                             # a transient file-system error: next beat


def _release(path: str, token: str, stop: threading.Event, pid: int) -> bool:
    stop.set()
    if os.getpid() != pid:                       # a forked child never releases its parent's lock
        return False
    gone = _remove_if(path, lambda moved: (moved.info or {}).get("token") == token)
    if gone:
        for marker in glob.glob(glob.escape(path) + ".break-*"):
            _unlink(marker)
    return gone


# ----------------------------------------------------------------------------- owner identity


def _owner_record(token: str) -> dict:
    job, attempt = _job()
    host, boot, pidns = _machine()
    return {"moetrain_lock": 1, "token": token, "host": host, "boot_id": boot, "pid_ns": pidns,
            "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "job": job, "attempt": attempt,
            "user": _user(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return str(os.getuid())


def _who(info: Optional[dict]) -> str:
    if info is None:
        return ""
    return (f" by pid {info.get('pid')} on host {info.get('host')} (job {info.get('job') or '-'}, "
            f"user {info.get('user')}, started {info.get('started')})")


def boot_id() -> str:
    """This machine's boot id ('' where there is no /proc): one value per machine and boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> tuple[str, str, str]:
    boot = boot_id()
    try:
        pidns = os.readlink("/proc/self/ns/pid") if boot else ""
    except OSError:
        boot = pidns = ""
    return socket.gethostname(), boot, pidns


def _proc_start(pid) -> Optional[str]:
    """Start time (clock ticks since boot) of live process pid; None when gone or a zombie; ''
    when alive but this system has no /proc to tell."""
    if not isinstance(pid, int) or not 0 < pid < 1 << 31:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()   # the name in (...) may hold spaces
        return None if fields[0] in ("Z", "X") else fields[19]
    except (OSError, IndexError):
        pass                                     # no /proc, or hidden (hidepid): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:                      # another user's live process
        pass
    return ""


def _local_verdict(info: dict) -> Optional[str]:
    """For an owner on this machine: a stale reason, or '' when it is alive. None: not here."""
    if (info.get("host"), info.get("boot_id"), info.get("pid_ns")) != _machine():
        return None
    pid, start = info.get("pid"), _proc_start(info.get("pid"))
    if start is None:
        return f"its process {pid} on this machine is gone"
    if start and info.get("pid_start") and start != info.get("pid_start"):
        return f"pid {pid} on this machine is now another process"
    return "" if start else None                 # no /proc: alive, maybe a reused pid; heartbeat


def _job() -> tuple[str, list]:
    """This run's job (Slurm job.step, or torchelastic run id; '' for none) and attempt: [Slurm
    restarts, torchelastic restarts], which compare in order."""
    e = os.environ
    attempt = [int(v) if v.isdigit() else 0 for v in (e.get("SLURM_RESTART_COUNT", "0"),
                                                        e.get("TORCHELASTIC_RESTART_COUNT", "0"))]
    if e.get("SLURM_JOB_ID"):
        return "slurm " + e["SLURM_JOB_ID"] + (f".{e['SLURM_STEP_ID']}" if e.get("SLURM_STEP_ID") else ""), attempt
    run = e.get("TORCHELASTIC_RUN_ID", "")
    return (f"torchelastic {run}" if run not in ("", "none") else ""), attempt


def _earlier(theirs, ours: list) -> bool:
    return isinstance(theirs, list) and len(theirs) == len(ours) and all(isinstance(x, int) for x in theirs) \
        and theirs < ours
