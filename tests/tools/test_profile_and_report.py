"""tools/profile_step.py and tools/expert_load_report.py: the region arithmetic by hand, then a real
2-rank profile (labels present in the Chrome trace, summary per rank) and a report from a real run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _tools import load_tool

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.progress=false",
        "train.device=cpu"]


_load = load_tool


@pytest.fixture(scope="module")
def profile_step():
    return _load("profile_step")


@pytest.fixture(scope="module")
def report():
    return _load("expert_load_report")


def _ev(name, start, end, thread=1):
    rng = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=rng, thread=thread, device_type=None, device_time_total=0)


def test_summary_arithmetic_by_hand(profile_step):
    # 2 steps of 10 ms; per step: dispatch 3 ms holding a 1 ms all-to-all, combine 2 ms holding
    # 1.5 ms, a 0.5 ms backward all-to-all, 1 ms gradient sync (times in us)
    ev = []
    for k, t0 in enumerate((0, 10_000)):
        ev += [_ev(f"ProfilerStep#{k}", t0, t0 + 10_000),
               _ev("moe/dispatch", t0 + 1000, t0 + 4000), _ev("moe/a2a/dispatch_wait", t0 + 2000, t0 + 3000),
               _ev("moe/experts", t0 + 4000, t0 + 5000),
               _ev("moe/combine", t0 + 5000, t0 + 7000), _ev("moe/a2a/combine", t0 + 5200, t0 + 6700),
               _ev("moe/a2a/combine_bwd", t0 + 8000, t0 + 8500), _ev("train/grad_sync", t0 + 9000, t0 + 10_000)]
    s = profile_step.summarize_events(ev, steps=2)
    assert s["step"] == pytest.approx(10.0)
    assert s["a2a_fwd"] == pytest.approx(2.5) and s["a2a_bwd"] == pytest.approx(0.5)
    assert s["grad_sync"] == pytest.approx(1.0) and s["comm"] == pytest.approx(4.0)
    assert s["compute"] == pytest.approx(6.0) and s["comm_pct"] == pytest.approx(40.0)
    assert s["dispatch"] == pytest.approx(2.0) and s["combine"] == pytest.approx(0.5)
    assert s["experts"] == pytest.approx(1.0)
    assert "rank" in profile_step.format_summary([s, s]).splitlines()[0]


def test_device_summary_from_trace(profile_step):
    ev = [{"ph": "X", "cat": "kernel", "name": "ncclDevKernel_SendRecv", "dur": 3000},
          {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm", "dur": 4000},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "dur": 1000},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 9999}]
    assert profile_step.device_summary(ev, steps=2) == {"gpu_comm": 1.5, "gpu_compute": 2.5}
    assert profile_step.device_summary(ev[3:], steps=2) == {}


@pytest.mark.slow
def test_two_rank_profile(tmp_path):
    out = tmp_path / "prof"
    r = subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), "--world", "2", "--warmup", "1", "--steps", "2",
                        "--threads", "1", "--out", str(out), *TINY, "parallel.ep=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["ep"] == 2 and len(summary["ms_per_step"]) == 2
    for s in summary["ms_per_step"]:
        assert s["step"] > 0 and s["a2a_fwd"] > 0 and s["a2a_bwd"] > 0 and s["experts"] > 0
        assert s["comm"] + s["compute"] == pytest.approx(s["step"], rel=1e-6)
    assert "comm_pct" in r.stdout and "mean" in r.stdout
    for rank in (0, 1):
        trace = (out / f"trace_rank{rank}.json").read_text()
        for label in ("moe/dispatch", "moe/experts", "moe/combine", "moe/a2a/dispatch", "moe/a2a/combine_bwd",
                      "train/grad_sync", "ProfilerStep"):
            assert f'"{label}' in trace, f"rank {rank}: no {label} in the trace"
    assert len(list((out / "tb").glob("rank*.pt.trace.json"))) == 2
    assert (out / "summary.png").stat().st_size > 10_000


def test_load_report_from_a_real_run(report, tmp_path):
    r = subprocess.run([sys.executable, "-m", "moetrain.train", "--config", "configs/tiny_cpu.yaml", *TINY,
                        "train.steps=3", "train.eval_every=0", "logging.every=1", "logging.tensorboard=false",
                        f"logging.dir={tmp_path}", "logging.run_name=r1", f"checkpoint.dir={tmp_path / 'ck'}",
                        "train.num_threads=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = report.build_report(str(tmp_path / "r1"), str(tmp_path / "rep"), prefix="t_")
    for name in ("expert_load", "rank_tokens", "drop_rate", "a2a_time"):
        assert Path(res[name]).name == f"t_{name}.png" and Path(res[name]).stat().st_size > 10_000
    assert "steps 1..3 (3 logged)" in res["summary"] and "layer 1:" in res["summary"]


def test_load_report_arithmetic_and_errors(report, tmp_path):
    recs = [{"step": 1, "loss": 5.0, "moe.layer0.routed": [6, 2, 0, 0]},
            {"step": 1, "loss": 4.0, "moe.layer0.routed": [1, 1, 1, 1]},     # resumed: last record wins
            {"step": 0, "val_loss": 5.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    rows = report.read_records(str(tmp_path))
    assert [x["loss"] for x in rows] == [4.0]
    assert report.load_matrix(rows, 0)[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(recs[0]) + "\n")
    assert report.load_matrix(report.read_records(str(tmp_path)), 0)[:, 0].tolist() == [3.0, 1.0, 0.0, 0.0]
    r = subprocess.run([sys.executable, str(TOOLS / "expert_load_report.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no metrics file" in r.stderr
