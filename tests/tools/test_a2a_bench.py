"""tools/a2a_bench.py: the split math by hand, then a real 2-rank gloo sweep (tiny sizes) that
writes the table, the JSON lines and the PNG, with every call's data checked by the tool."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tools import load_tool

pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "a2a_bench.py"


@pytest.fixture(scope="module")
def bench():
    return load_tool("a2a_bench")


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
    r = subprocess.run([sys.executable, str(SCRIPT), "--world", "2", "--device", "cpu", "--min-bytes", "1K",
                        "--max-bytes", "16K", "--warmup", "1", "--iters", "3", "--out", str(out)],
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
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--splits", "uniform,bogus",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["a2a_bench: error: --splits: unknown pattern(s) ['bogus']; "
                                             "allowed: uniform, zipf, hot"]


# ----------------------------------------------------------------------------- device placement
# NCCL (and gloo made for CUDA, "cuda:gloo") rejects CPU tensors, so every tensor the tool hands to
# a collective must be on the benchmark's device. On this CPU-only machine the "meta" device stands
# in for CUDA: a meta tensor is not a CPU tensor, so a collective that sees only meta tensors was
# given everything on the requested device.

META = torch.device("meta")


class FakeDist:
    """Records (collective, device of every tensor argument); moves no data."""

    class ReduceOp:
        MAX = "max"

    def __init__(self):
        self.calls: list[tuple[str, set]] = []

    def _record(self, name, *tensors):
        devs = set()
        for t in tensors:
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if hasattr(x, "device"):
                    devs.add(x.device)
        self.calls.append((name, devs))

    def all_reduce(self, t, op=None, group=None):
        self._record("all_reduce", t)

    def all_gather(self, out, t, group=None):
        self._record("all_gather", out, t)

    def all_to_all_single(self, out, inp, out_splits=None, in_splits=None, group=None):
        self._record("all_to_all_single", out, inp)

    def barrier(self, group=None):
        self.calls.append(("barrier", set()))

    def get_backend(self, group=None):
        return "fake"


@pytest.fixture
def fake(bench, monkeypatch):
    d = FakeDist()
    monkeypatch.setattr(bench, "dist", d)
    # meta tensors hold no data: answer the host reads with plausible numbers of the right shape
    def host_values(t):
        assert t.device == META, f"host read of a {t.device} tensor, expected {META}"
        if t.dim() == 1:
            return [1e-4] * t.shape[0]
        return [[1e-4 * (r + 1), 1024.0 * (r + 1)] for r in range(t.shape[0])]
    monkeypatch.setattr(bench, "_host_values", host_values, raising=False)
    return d


def _devices(d: FakeDist) -> set:
    return set().union(*(devs for _, devs in d.calls)) if d.calls else set()


def test_bookkeeping_collectives_use_the_requested_device(bench, fake):
    assert bench._max_over_ranks(0.5, 2, None, META) == 1e-4
    assert bench._gather_floats([1.0, 2.0], 2, None, META) == [[1e-4, 1024.0], [2e-4, 2048.0]]
    assert [n for n, _ in fake.calls] == ["all_reduce", "all_gather"]
    assert _devices(fake) == {META}
    # one rank: no collective at all, the values come straight back
    fake.calls.clear()
    assert bench._gather_floats([1.0, 2.0], 1, None, META) == [[1.0, 2.0]]
    assert fake.calls == []


def test_measure_hands_only_device_tensors_to_collectives(bench, fake, monkeypatch):
    compared = []

    def equal(a, b):            # meta tensors cannot be compared: check where they are instead
        compared.append((a.device, b.device))
        return True
    monkeypatch.setattr(torch, "equal", equal)
    args = bench.build_parser().parse_args(["--warmup", "2", "--iters", "3"])
    for pattern in bench.PATTERNS:
        fake.calls.clear()
        row = bench.measure(pattern, 4096, args, 0, 2, META, group=None)
        names = [n for n, _ in fake.calls]
        # data check, warmup x2, per-call max, timed calls, per-rank results
        assert names[0] == "all_to_all_single" and names.count("all_reduce") == 1
        assert names.count("all_gather") == 1 and names.count("all_to_all_single") == 1 + 2 + row["iters"]
        assert _devices(fake) == {META}, fake.calls
        assert row["time_us_per_rank"] == [100.0, 200.0] and row["recv_max_bytes"] == 2048
    assert compared and set(compared) == {(META, META)}
    # rank 1 takes part in the same collectives and returns nothing
    fake.calls.clear()
    assert bench.measure("hot", 4096, args, 1, 2, META, group=None) is None
    assert _devices(fake) == {META}


def test_backend_flag_reaches_init_parallel(bench, monkeypatch):
    import moetrain.parallel.mesh as mesh
    seen = {}

    class Stop(Exception):
        pass

    def init_parallel(*a, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr(mesh, "init_parallel", init_parallel)
    args = bench.build_parser().parse_args(["--backend", "gloo", "--device", "cpu"])
    with pytest.raises(Stop):
        bench.rank_main(args, 0, 2)
    assert seen == {"device_kind": "cpu", "backend": "gloo"}
    assert bench.build_parser().parse_args([]).backend == "auto"


def test_local_ranks_on_too_few_gpus_need_gloo(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = bench.build_parser().parse_args(["--world", "2"])
    with pytest.raises(SystemExit, match="NCCL needs one GPU per rank; add --backend gloo"):
        bench.check_local_gpus(args)
    bench.check_local_gpus(bench.build_parser().parse_args(["--world", "2", "--backend", "gloo"]))
    bench.check_local_gpus(bench.build_parser().parse_args(["--world", "2", "--device", "cpu"]))
    bench.check_local_gpus(bench.build_parser().parse_args(["--world", "1"]))


def test_nccl_without_cuda_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--backend", "nccl", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["a2a_bench: error: --backend nccl needs CUDA, but --device cpu was given"]


def test_one_rank_gloo_run(tmp_path):
    out = tmp_path / "a2a1"
    r = subprocess.run([sys.executable, str(SCRIPT), "--world", "1", "--backend", "gloo", "--device", "cpu",
                        "--min-bytes", "1K", "--max-bytes", "4K", "--splits", "uniform,hot", "--warmup", "1",
                        "--iters", "2", "--no-plot", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "a2a_bench.jsonl").read_text().splitlines()]
    assert [(x["splits"], x["size_bytes"]) for x in rows] == [(p, s) for p in ("uniform", "hot") for s in (1024, 4096)]
    assert all(x["world"] == 1 and x["backend"] == "gloo" and x["device"] == "cpu" for x in rows)
