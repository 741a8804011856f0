"""Smoke test of tools/bench_moe.py at tiny sizes: it runs, and its JSON lines carry the keys.

World-1 runs of our layer and the dense FFN go in-process (no process group is created for
them); DeepSpeed and world 2 create process groups, so they run in child processes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")
SCRIPT = os.path.join(TOOLS, "bench_moe.py")
TINY = ["--tokens", "64", "--dim", "16", "--hidden", "32", "--experts", "4,8", "--k", "2",
        "--warmup", "1", "--iters", "2", "--threads", "1"]
KEYS = {"system", "experts", "tokens", "world", "ms", "fwd_ms", "impl", "k", "dim", "hidden",
        "capacity_factor", "a2a_ms", "a2a_share", "drop_frac", "ms_per_rank", "threads", "steal_frac"}


@pytest.fixture(scope="module")
def bench():
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import bench_moe
    return bench_moe


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _check(records: list[dict], world: int, systems: set[str]) -> None:
    assert {r["system"] for r in records} == systems
    for r in records:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert r["world"] == world and r["tokens"] == 64 and r["k"] == 2
        assert r["experts"] in (4, 8)
        assert r["ms"] > 0 and 0 <= r["fwd_ms"] <= r["ms"]
        assert len(r["ms_per_rank"]) == world
        if r["system"] != "dense":
            assert r["ratio_to_dense"] > 0
        if r["system"] == "moetrain":
            assert r["impl"] in ("loop", "bmm")
            assert 0.0 <= r["drop_frac"] <= 1.0
            assert (r["a2a_ms"] is None) == (world == 1)


def test_world1_ours_and_dense(bench, tmp_path, capsys):
    out_file = tmp_path / "bench.jsonl"
    assert bench.main([*TINY, "--systems", "dense,moetrain", "--impl", "all", "--json", str(out_file)]) == 0
    stdout = capsys.readouterr().out
    printed = _records(stdout)
    assert printed == [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(printed) == 2 * 3                 # per E: dense, loop, bmm
    _check(printed, 1, {"dense", "moetrain"})
    assert "x dense" in stdout                   # the table


def test_dropless_flag(bench, capsys):
    bench.main([*TINY, "--systems", "moetrain", "--impl", "loop", "--capacity-factor", "none", "--experts", "4"])
    (rec,) = _records(capsys.readouterr().out)
    assert rec["capacity_factor"] is None and rec["drop_frac"] == 0.0


def test_bad_flags_exit_with_one_line(bench):
    with pytest.raises(SystemExit, match="not divisible"):
        bench.main([*TINY, "--world", "3"])
    with pytest.raises(SystemExit, match="unknown"):
        bench.main([*TINY, "--systems", "megablocks"])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_world1_deepspeed_subprocess():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--systems", "dense,deepspeed", "--experts", "4"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if "deepspeed is not importable" in proc.stdout:
        pytest.skip(proc.stdout.splitlines()[1])
    _check(_records(proc.stdout), 1, {"dense", "deepspeed"})


def test_world2_spawn(bench, tmp_path):
    out_file = tmp_path / "bench.jsonl"             # the ranks print from child processes
    bench.main([*TINY, "--systems", "dense,moetrain", "--impl", "loop", "--world", "2", "--experts", "4",
                "--json", str(out_file)])
    printed = _records(out_file.read_text())
    _check(printed, 2, {"dense", "moetrain"})
    ours = next(r for r in printed if r["system"] == "moetrain")
    assert ours["a2a_ms"] > 0 and ours["a2a_share"] > 0


def test_steal_meter_reads_proc_stat_deltas(tmp_path, monkeypatch, bench):
    """Steal share = delta(steal) / delta(user..steal) between start and end; None when the
    file is missing or malformed; the table footer warns above 5%."""
    import tools._cpu_steal as cs
    stat = tmp_path / "stat"
    monkeypatch.setattr(cs, "_STAT", str(stat))
    stat.write_text("cpu  100 0 50 800 0 0 0 50 7 0\ncpu0 1 2 3\n")
    meter = cs.StealMeter().start()
    # +60 user, +20 system, +100 idle, +20 steal (guest +7 is inside user: not added again)
    stat.write_text("cpu  160 0 70 900 0 0 0 70 14 0\n")
    assert meter.fraction() == pytest.approx(20 / 200)
    stat.write_text("intr 1 2 3\n")
    assert cs.StealMeter().start().fraction() is None
    monkeypatch.setattr(cs, "_STAT", str(tmp_path / "missing"))
    assert cs.StealMeter().start().fraction() is None

    recs = [{"experts": 8, "steal_frac": 0.01}, {"experts": 128, "steal_frac": 0.2}]
    out = bench.format_steal(recs)
    assert "E=8 1%" in out and "E=128 20%" in out and "warning" in out
    assert "warning" not in bench.format_steal(recs[:1])
    assert bench.format_steal([{"experts": 8, "steal_frac": None}]) is None
