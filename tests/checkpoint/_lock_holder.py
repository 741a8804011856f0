"""Helper process for test_dir_lock.py: `python _lock_holder.py DIR STALE_S`.

Prints READY, waits for a line on stdin, tries to take DIR's lock and prints one line: WON <pid>
(then holds it, heartbeating, until stdin closes, releases and prints RELEASED <bool>), or
REFUSED <message> (exit 3)."""
import os
import sys

from moetrain.checkpoint.lock import CheckpointLockError, DirLock

lock = DirLock(sys.argv[1], stale_s=float(sys.argv[2]), heartbeat_s=0.2)
print("READY", flush=True)
sys.stdin.readline()
try:
    warning = lock.acquire()
except CheckpointLockError as exc:
    print(f"REFUSED {exc}", flush=True)
    raise SystemExit(3)
print(f"WON {os.getpid()} {warning or ''}".rstrip(), flush=True)
sys.stdin.read()
print(f"RELEASED {lock.release()}", flush=True)
