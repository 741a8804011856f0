"""Ranks that disagree at start-up (issue 15): a config override or code on one rank only, or a
rank that never arrives. Every arrived rank must end with exit 2 and the same one line, quickly
(not silently different weights, a hang until the collective timeout, or a gloo abort)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _dist import run_dist
from _launch import REPO, finish, free_port, launch_env, tail, tiny_overrides
from moetrain.config import PER_RANK_KEYS, agreement_view, load_config
from moetrain.parallel.mesh import LaunchEnv, LaunchError, init_parallel
from moetrain.parallel.rendezvous import code_fingerprint, describe_disagreement
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

QUICK_S = 60          # well under the 600 s collective timeout, with room for a loaded 2-core box


def _launch_ranks(tmp: Path, per_rank: dict[int, list[str]], world: int = 2, rdzv_s: str = "60",
                  pythonpath: dict[int, str] | None = None, cwd: dict[int, Path] | None = None):
    """Start `python -m moetrain.train` for the ranks in per_rank (rank -> extra overrides) with
    torchrun-style variables; ranks left out never start. Returns (exit codes, logs, seconds)."""
    port = free_port()
    procs, logs = [], []
    t0 = time.monotonic()
    for rank, extra in per_rank.items():
        env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                         LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MOETRAIN_RENDEZVOUS_TIMEOUT=rdzv_s)
        if pythonpath and rank in pythonpath:
            env["PYTHONPATH"] = pythonpath[rank]
        log = tmp / f"rank{rank}.log"
        cmd = [sys.executable, "-m", "moetrain.train", *tiny_overrides(tmp), *extra]
        f = open(log, "wb")
        procs.append(subprocess.Popen(cmd, cwd=(cwd or {}).get(rank, REPO), env=env, stdout=f,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    codes = finish(procs, timeout_s=180)
    return codes, logs, time.monotonic() - t0


def _error_lines(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if line.startswith("moetrain: error:")]


@pytest.mark.parametrize("override, shown", [
    ("train.lr=0.001", "train.lr (0.001 vs 0.003)"),           # used to finish with different weights
    ("train.steps=5", "train.steps (5 vs 3)"),                 # used to hang until the collective timeout
    ("model.dim=64", "model.dim (64 vs 32)"),                  # used to abort inside gloo
    ("checkpoint.every=2", "checkpoint.every (2 vs 0)"),       # used to hang at the first save
])
def test_override_on_one_rank_ends_every_rank(tmp_path, override, shown):
    codes, logs, elapsed = _launch_ranks(tmp_path, {0: [], 1: [override]})
    report = "\n".join(f"--- rank {i} (exit {c}):\n{tail(l)}" for i, (c, l) in enumerate(zip(codes, logs)))
    assert codes == [2, 2], report
    assert elapsed < QUICK_S, report
    lines = [_error_lines(log) for log in logs]
    assert all(len(ls) == 1 for ls in lines), report
    assert lines[0] == lines[1], report
    assert f"rank 1 differs from rank 0 in {shown}" in lines[0][0], report
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


def test_rank_that_never_starts_ends_the_others_at_the_rendezvous_timeout(tmp_path):
    codes, logs, elapsed = _launch_ranks(tmp_path, {0: []}, rdzv_s="5")
    assert codes == [2], tail(logs[0])
    assert elapsed < 5 + 40, f"{elapsed:.0f}s\n{tail(logs[0])}"      # start-up (imports, data) + 5 s
    (line,) = _error_lines(logs[0])
    assert "only 1 of 2 ranks arrived" in line and "within 5 s" in line, line
    assert "missing: rank 1" in line and "MOETRAIN_RENDEZVOUS_TIMEOUT" in line, line


def test_rank_0_that_never_starts_ends_the_others(tmp_path):
    codes, logs, elapsed = _launch_ranks(tmp_path, {1: []}, rdzv_s="5")
    assert codes == [2], tail(logs[0])
    assert elapsed < 5 + 40, f"{elapsed:.0f}s\n{tail(logs[0])}"
    (line,) = _error_lines(logs[0])
    assert "could not reach the rendezvous" in line and "within 5 s" in line, line


def test_different_code_on_one_rank(tmp_path):
    """Rank 1 imports a copy of moetrain with one source file changed."""
    copy = tmp_path / "other"
    shutil.copytree(REPO / "moetrain", copy / "moetrain", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "moetrain" / "precision.py", "a") as f:
        f.write("\n# edited on one node only\n")
    codes, logs, elapsed = _launch_ranks(tmp_path, {0: [], 1: []}, pythonpath={1: str(copy)},
                                         cwd={1: tmp_path})
    report = "\n".join(f"--- rank {i} (exit {c}):\n{tail(l)}" for i, (c, l) in enumerate(zip(codes, logs)))
    assert codes == [2, 2], report
    lines = [_error_lines(log) for log in logs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, report
    assert "rank 1 runs other code than rank 0 (moetrain/precision.py)" in lines[0][0], report


# --------------------------------------------------------------------------- in-process ranks

def _agree_body(rank, world, payloads, absent, timeout_s):
    os.environ["MOETRAIN_RENDEZVOUS_TIMEOUT"] = str(timeout_s)
    if rank in absent:
        return None
    env = LaunchEnv(rank, world, rank, world, "torchrun")
    t0 = time.monotonic()
    try:
        init_parallel(world, 1, 1, env, "cpu", agree=payloads[rank])
        return ("ok", time.monotonic() - t0)
    except LaunchError as exc:
        return (str(exc), time.monotonic() - t0)


def test_two_ranks_that_differ_give_one_line_naming_the_first_and_counting_the_rest():
    same = {"config": {"a.x": 1, "b.y": "s"}}
    other = {"config": {"a.x": 2, "b.y": "s"}}
    out = run_dist(_agree_body, world=3, args=([same, other, other], (), 30))
    msgs = {m for m, _ in out}
    assert len(msgs) == 1, out
    (msg,) = msgs
    assert "differs from rank 0 in a.x (2 vs 1)" in msg and "(1 more rank differs too)" in msg, msg


def test_missing_rank_names_it_on_every_arrived_rank():
    p = {"config": {"a.x": 1}}
    out = run_dist(_agree_body, world=3, args=([p, p, p], (2,), 3))
    assert out[2] is None
    assert out[0][0] == out[1][0], out
    assert "only 2 of 3 ranks arrived" in out[0][0] and "missing: rank 2" in out[0][0], out
    assert all(t < 3 + 15 for _, t in out[:2]), out


# --------------------------------------------------------------------------- the pieces

def test_per_rank_keys_are_left_out_of_the_comparison(tmp_path):
    a = load_config(None, ["train.device=cpu", "train.num_threads=1", f"data.cache_dir={tmp_path / 'a'}"])
    b = load_config(None, ["train.device=cpu", "train.num_threads=2", f"data.cache_dir={tmp_path / 'b'}"])
    assert agreement_view(a) == agreement_view(b)
    view = agreement_view(a)["config"]
    assert not set(PER_RANK_KEYS) & set(view)
    assert view["train.lr"] == 3e-3 and view["moe.zero_experts.copy"] == 0 and view["parallel.dp"] is None


def test_describe_disagreement():
    code = code_fingerprint()
    assert "moetrain/parallel/mesh.py" in code and "torch" in code
    ref = {"code": code, "config": {"x.a": 1, "x.b": None, "x.c": True}}
    assert describe_disagreement(ref, ref, 3) == ""
    mine = {"code": dict(code, torch="0.0.1"), "config": {"x.a": 1, "x.b": "p", "x.c": False}}
    msg = describe_disagreement(mine, ref, 3)
    assert msg.startswith("rank 3 runs other code than rank 0 (torch 0.0.1 vs ")
    assert "differs in x.b (p vs null), x.c (false vs true)" in msg, msg
    mine = {"code": {k: v for k, v in code.items() if k != "moetrain/config.py"}, "config": ref["config"]}
    assert "moetrain/config.py only on rank 0" in describe_disagreement(mine, ref, 1)
    many = {"config": {f"k{i}": i for i in range(10)}}
    msg = describe_disagreement(many, {"config": {}}, 1)
    assert "and 4 more" in msg and "\n" not in msg, msg
