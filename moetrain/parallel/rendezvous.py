"""Start-up rendezvous: the ranks meet at the TCPStore, with a timeout of their own, and agree on
their code and resolved config before any process group or collective exists.

Why a store of our own: torch's env:// rendezvous waits with the collective timeout (600 s here)
and a missing rank then ends the others with a traceback; creating the gloo/NCCL groups and the
device mesh also waits on every peer, so a rank with another layout could hang there before any
"first collective". Here a missing rank or a rank started with other overrides or other code ends
every arrived rank with one line (LaunchError) within MOETRAIN_RENDEZVOUS_TIMEOUT; the store is
then handed to init_process_group (parallel/mesh.init_parallel).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moetrain.parallel.mesh import LaunchEnv, LaunchError, _master_port, _seconds_env

RENDEZVOUS_TIMEOUT_ENV = "MOETRAIN_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now (single-machine launches, tests and tools)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_timeout() -> float:
    """How long the ranks wait for each other at start-up: MOETRAIN_RENDEZVOUS_TIMEOUT seconds
    (default 300), separate from the collective timeout, so a rank that never starts ends the
    others in minutes with one line instead of at the collective timeout with a traceback."""
    return _seconds_env(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)


# --------------------------------------------------------------------------- start-up agreement

@lru_cache(maxsize=1)
def code_fingerprint() -> dict:
    """What must be identical on every rank besides the config: a SHA-256 (16 hex digits) of each
    source file of the imported moetrain package, by path, and the torch version. Hashing the
    sources rather than asking git works without git on the compute nodes and also catches
    uncommitted edits; 40-odd files, about a millisecond."""
    root = Path(__file__).resolve().parents[1]             # .../moetrain
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        try:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except OSError:
            out[rel] = "unreadable"
    out["torch"] = torch.__version__
    return out


def _show(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _listed(items: list, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe_disagreement(mine: dict, ref: dict, rank: int) -> str:
    """One line: how this rank's start-up payload ({"code": {...}, "config": {dotted key: value}})
    differs from rank 0's (values shown as "this rank's vs rank 0's"), or "" when it does not."""
    mc, rc = mine.get("code", {}), ref.get("code", {})
    code = [k for k in sorted(set(mc) | set(rc)) if mc.get(k) != rc.get(k)]
    mk, rk = mine.get("config", {}), ref.get("config", {})
    keys = [k for k in sorted(set(mk) | set(rk)) if mk.get(k, "<unset>") != rk.get(k, "<unset>")]
    config = _listed([f"{k} ({_show(mk.get(k))} vs {_show(rk.get(k))})" for k in keys])
    if code:
        shown = [f"torch {_show(mc.get(k))} vs {_show(rc.get(k))}" if k == "torch"
                 else k + ("" if k in mc and k in rc else " only on rank 0" if k in rc else f" only on rank {rank}")
                 for k in code]
        return (f"rank {rank} runs other code than rank 0 ({_listed(shown)})"
                + (f" and differs in {config}" if keys else "")
                + ": install the same moetrain and torch on every node")
    if keys:
        return f"rank {rank} differs from rank 0 in {config}: start every rank with the same config file and overrides"
    return ""


_AGREE_ROUND = [0]      # init_parallel calls in this process: keys of a reused (torchrun agent) store stay apart


def _group_tag() -> str:
    """Keeps one worker group's start-up keys apart from an earlier group's in a store that
    outlives groups (torchrun's shared agent store: the restart count, which agrees between agents
    that restart together). A fresh store per group (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, what
    elastic jobs use) needs no tag, and must not have this one: an agent that joins an elastic job
    later starts counting from 0 while the others are at their n-th group."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") + "/"
    return ""


def _wait_key(store, key: str, deadline: float) -> bool:
    """Poll for `key` until the deadline. Polling check() instead of store.wait(): a wait that
    times out makes c10d print warnings, and this runs exactly when something is wrong."""
    delay = 0.002
    while True:
        if store.check([key]):
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.5)


def agree_at_startup(store, rank: int, world: int, payload: dict, timeout_s: float, where: str = "",
                     deadline: Optional[float] = None) -> None:
    """Every rank's start-up payload (resolved config, code fingerprint) against rank 0's, through
    the rendezvous store: no collective, no device, so it works alike under gloo and NCCL and
    before a mismatched layout could reach one. A missing rank or a difference raises LaunchError
    with the same line on every arrived rank; rank 0 (which usually hosts the store) lingers
    until the others have read the verdict.

    Keys: ref/ref_digest (rank 0's payload), arrived/checked counters, bad (count) + bad_msg (the
    first differing rank's line), go ("ok" from the last rank to check in, or "missing N" from a
    rank whose wait timed out), left/all_left (the linger). `deadline` (time.monotonic()): when
    this rank's rendezvous wait began + timeout_s, so connecting and agreeing share one timeout."""
    _AGREE_ROUND[0] += 1
    p = f"moetrain/startup/{_group_tag()}{_AGREE_ROUND[0]}/"
    if deadline is None:
        deadline = time.monotonic() + timeout_s
    blob = json.dumps(payload, sort_keys=True, default=str)
    payload = json.loads(blob)            # compared as rank 0's arrives: JSON values
    digest = hashlib.sha256(blob.encode()).hexdigest()
    if rank == 0:
        store.set(p + "ref", blob)
        store.set(p + "ref_digest", digest)
    store.set(p + f"here/{rank}", "1")
    store.add(p + "arrived", 1)
    verdict = ""
    if rank != 0:
        if not _wait_key(store, p + "ref_digest", deadline):
            _startup_failed(store, p, rank, world, timeout_s, where)
        if store.get(p + "ref_digest").decode() != digest:
            verdict = describe_disagreement(payload, json.loads(store.get(p + "ref").decode()), rank) \
                or f"rank {rank}'s start-up payload differs from rank 0's"
    if verdict and store.add(p + "bad", 1) == 1:
        store.set(p + "bad_msg", verdict)
    if store.add(p + "checked", 1) == world:
        store.compare_set(p + "go", "", "ok")
    # rank 0 decides a timeout; the others give it a few seconds more to do so
    if not _wait_key(store, p + "go", deadline + (0 if rank == 0 else 5)):
        _startup_failed(store, p, rank, world, timeout_s, where)
    go = store.get(p + "go").decode()
    if go != "ok":
        _startup_failed(store, p, rank, world, timeout_s, where, go)
    bad = store.add(p + "bad", 0)
    if bad:
        msg = store.get(p + "bad_msg").decode()
        if bad > 1:
            msg += f" ({bad - 1} more rank{'s' if bad > 2 else ''} differ{'' if bad > 2 else 's'} too)"
        _leave(store, p, rank, world)
        raise LaunchError(msg)


def _startup_failed(store, p: str, rank: int, world: int, timeout_s: float, where: str, go: str = "") -> None:
    """A wait timed out (go == "") or another rank already decided so (go == "missing ..."): the
    first rank to decide records how many ranks arrived and which are absent, so every rank
    prints the same line."""
    if not go:
        arrived = store.add(p + "arrived", 0)
        absent = [str(r) for r in range(world) if not store.check([p + f"here/{r}"])] if world <= 4096 else []
        go = store.compare_set(p + "go", "", f"missing {arrived} {','.join(absent)}").decode()
        if go == "ok":         # the last rank checked in just now
            return
    fields = go.split(" ")
    arrived, absent = int(fields[1]), [a for a in (fields[2] if len(fields) > 2 else "").split(",") if a]
    missing = f"; missing: rank{'s' if len(absent) > 1 else ''} {_listed(absent)}" if absent else ""
    _leave(store, p, rank, arrived)
    hint = ("; if this is an elastic job whose agents joined at different times: under torchrun's shared agent "
            "store they never meet here, run the agents with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(launch/torchrun.sh does)"
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "")
    raise LaunchError(f"only {arrived} of {world} ranks arrived at the rendezvous{where} within {timeout_s:g} s "
                      f"({RENDEZVOUS_TIMEOUT_ENV}){missing}: are all ranks started? (a rank that failed "
                      f"its start-up checks said why in its own output){hint}")


def _leave(store, p: str, rank: int, expected: int) -> None:
    """Count this rank out; rank 0, whose process usually hosts the store, waits (bounded) until
    the `expected` ranks have read the verdict, so none of them sees a vanished store instead."""
    try:
        if store.add(p + "left", 1) >= expected:
            store.set(p + "all_left", "1")
        if rank == 0:
            _wait_key(store, p + "all_left", time.monotonic() + 30)
    except Exception:              # the store is gone: nobody is left to wait for
        pass


def open_store(env: LaunchEnv, timeout_s: float, deadline: float):
    """The rendezvous TCPStore, opened with the rendezvous timeout (torch's env:// rendezvous
    would use the collective timeout). As torch does: under torchrun the agent hosts the store
    and every rank is a client; otherwise rank 0 hosts it. Rank 0 does not wait for the others
    here (agree_at_startup counts them); a client first polls the port quietly, since a
    TCPStore client that cannot connect prints pages of C++ stack traces."""
    addr, port = os.environ["MASTER_ADDR"], _master_port()
    world = env.world_size
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the agent's store outlives the workers, so a restarted worker group would meet the
        # previous group's keys (arrivals, gloo addresses); no key the workers of one group share
        # tells the groups apart (TORCHELASTIC_RESTART_COUNT differs between agents: a membership
        # change does not count as a restart). Elastic jobs should run their agents with
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/torchrun.sh does): then every group gets a
        # fresh store hosted by its rank 0, the branch below.
        return dist.TCPStore(addr, port, world, False, timedelta(seconds=timeout_s), use_libuv=use_libuv)
    if env.rank == 0:
        return dist.TCPStore(addr, port, world, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                             multi_tenant=True, use_libuv=use_libuv)
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))).close()
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise LaunchError(f"rank {env.rank} could not reach the rendezvous at {addr}:{port} (rank 0) "
                                  f"within {timeout_s:g} s ({RENDEZVOUS_TIMEOUT_ENV}): is rank 0 started, "
                                  "and MASTER_ADDR reachable from this node?") from None
            time.sleep(0.2)
    remaining = max(1.0, deadline - time.monotonic())
    return dist.TCPStore(addr, port, world, False, timedelta(seconds=remaining), use_libuv=use_libuv)
