"""tools/a2a_bench.py: the split math by hand, then a real 2-rank gloo sweep (tiny sizes) that
writes the table, the JSON lines and the PNG, with every call's data checked by the tool."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "a2a_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("a2a_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byte_sizes(bench):
    assert bench.parse_bytes("1K") == 1024
    assert bench.parse_bytes("64KiB") == 65536
    assert bench.parse_bytes("256M") == 256 * 2 ** 20
    assert bench.build_parser().parse_args(["--max-bytes", "256M"]).max_bytes == 256 * 2 ** 20
    assert bench.sizes(1024, 256 * 2 ** 20, 4) == [1024 * 4 ** i for i in range(10)]
    assert bench.fmt_bytes(256 * 2 ** 20) == "256M" and bench.fmt_bytes(1536) == "1536"


def test_rank_shares_by_hand(bench):
    assert bench.rank_shares("uniform", 4) == pytest.approx([0.25] * 4)
    # 2 ranks x 2 experts, Zipf s=1: p ~ 1, 1/2, 1/3, 1/4 (sum 25/12) -> rank 0 gets (1 + 1/2) * 12/25
    assert bench.rank_shares("zipf", 2, experts_per_rank=2, zipf_s=1.0) == pytest.approx([18 / 25, 7 / 25])
    # hot expert 5 of 8 (rank 2 of 4) takes 60%; the other 40% spread over all 8 experts
    shares = bench.rank_shares("hot", 4, experts_per_rank=2, hot_frac=0.6, hot_expert=5)
    assert shares == pytest.approx([0.1, 0.1, 0.7, 0.1])
    for p in bench.PATTERNS:
        assert sum(bench.rank_shares(p, 8)) == pytest.approx(1.0)


def test_send_matrix_rows_sum_to_count(bench):
    assert bench.split_counts(10, [1 / 3] * 3) == [4, 3, 3]
    for p in bench.PATTERNS:
        S = bench.send_matrix(p, 4, 1000, experts_per_rank=2)
        assert all(sum(row) == 1000 for row in S) and all(len(row) == 4 for row in S)
    assert bench.send_matrix("uniform", 4, 1000) == [[250] * 4] * 4


def test_bus_bandwidth_is_nccl_tests_formula(bench):
    assert bench.bus_bandwidth(8.0, 4) == pytest.approx(6.0)
    assert bench.bus_bandwidth(8.0, 1) == 0.0


def test_two_rank_sweep_writes_table_json_and_png(bench, tmp_path):
    out = tmp_path / "a2a"
    r = subprocess.run([sys.executable, str(SCRIPT), "--world", "2", "--min-bytes", "1K", "--max-bytes", "16K",
                        "--warmup", "1", "--iters", "3", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "busbw" in r.stdout and "uniform" in r.stdout
    rows = [json.loads(line) for line in (out / "a2a_bench.jsonl").read_text().splitlines()]
    assert [(x["splits"], x["size_bytes"]) for x in rows] == [
        (p, s) for p in ("uniform", "zipf", "hot") for s in (1024, 4096, 16384)]
    for x in rows:
        assert x["world"] == 2 and x["backend"] == "gloo" and x["iters"] >= 2
        assert x["time_min_us"] <= x["time_us"] <= x["time_max_us"] and len(x["time_us_per_rank"]) == 2
        assert x["algbw_gbs"] == pytest.approx(x["size_bytes"] / (x["time_us"] * 1e-6) / 1e9)
        assert x["busbw_gbs"] == pytest.approx(x["algbw_gbs"] / 2)
    skew = {x["splits"]: x["recv_imbalance"] for x in rows if x["size_bytes"] == 16384}
    assert skew["uniform"] == pytest.approx(1.0) and skew["zipf"] > 1.3 and skew["hot"] == pytest.approx(1.5, rel=0.01)
    assert (out / "a2a_bench.png").stat().st_size > 10_000
    # --plot merges result files (e.g. two world sizes) into one figure, without any process group
    png = tmp_path / "merged.png"
    r = subprocess.run([sys.executable, str(SCRIPT), "--plot", str(out / "a2a_bench.jsonl"), "--png", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.stat().st_size > 10_000


def test_bad_pattern_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--splits", "uniform,bogus", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["a2a_bench: error: --splits: unknown pattern(s) ['bogus']; "
                                             "allowed: uniform, zipf, hot"]
