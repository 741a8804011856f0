"""Smoke test of tools/bench_moe.py at tiny sizes: it runs, and its JSON lines carry the keys.

World-1 runs of our layer and the dense FFN go in-process (no process group is created for
them); DeepSpeed and world 2 create process groups, so they run in child processes.

--device cuda cannot run here; its code paths are dry-run on the CPU as far as they go: argument
handling and refusals (with torch.cuda's answers faked where a refusal depends on them), and the
whole cuda schedule (one block per system, bf16 autocast, event timing read only after a
synchronize, DeepSpeed's fp32 gate and kept-row count) with CPU autocast and fake CUDA events.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")
SCRIPT = os.path.join(TOOLS, "bench_moe.py")
TINY = ["--tokens", "64", "--dim", "16", "--hidden", "32", "--experts", "4,8", "--k", "2",
        "--warmup", "1", "--iters", "2", "--threads", "1"]
KEYS = {"system", "experts", "tokens", "world", "ms", "fwd_ms", "impl", "k", "dim", "hidden",
        "capacity_factor", "a2a_ms", "a2a_share", "drop_frac", "ms_per_rank", "threads", "steal_frac",
        "tflops", "expert_rows", "expert_rows_from", "device", "dtype", "gpu", "backend"}
FAKE_GPU = {"name": "fake", "capability": "0.0", "torch": torch.__version__, "cuda": None}


@pytest.fixture(scope="module")
def bench():
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import bench_moe
    return bench_moe


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _check(records: list[dict], world: int, systems: set[str], gpu=None) -> None:
    assert {r["system"] for r in records} == systems
    for r in records:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert r["world"] == world and r["tokens"] == 64 and r["k"] == 2
        assert r["experts"] in (4, 8)
        assert r["ms"] > 0 and 0 <= r["fwd_ms"] <= r["ms"]
        assert len(r["ms_per_rank"]) == world
        assert r["device"] == "cpu" and r["gpu"] == gpu
        assert r["dtype"] == ("fp32" if gpu is None else "bf16-autocast")
        # expert TFLOP/s = 3 * 2 * rows * 3 * dim * hidden / time
        assert 0 < r["expert_rows"] <= 64 * 2 and r["tflops"] > 0
        assert r["tflops"] == pytest.approx(18 * r["expert_rows"] * 16 * 32 / (r["ms"] * 1e9),
                                            rel=1e-3 + 5e-4 / r["ms"])      # ms is rounded to 3 decimals
        assert r["expert_rows_from"] == ("tokens*k" if r["system"] == "dense" else "kept")
        if r["system"] == "dense":
            assert r["expert_rows"] == 64 * 2
        if r["system"] != "dense":
            assert r["ratio_to_dense"] > 0
        if r["system"] == "moetrain":
            assert r["impl"] in ("loop", "bmm", "grouped")
            assert 0.0 <= r["drop_frac"] <= 1.0
            assert r["expert_rows"] == pytest.approx(128 * (1 - r["drop_frac"]), abs=0.15)
            assert (r["a2a_ms"] is None) == (world == 1)


def test_world1_ours_and_dense(bench, tmp_path, capsys):
    out_file = tmp_path / "bench.jsonl"
    assert bench.main([*TINY, "--systems", "dense,moetrain", "--impl", "all", "--json", str(out_file)]) == 0
    stdout = capsys.readouterr().out
    printed = _records(stdout)
    assert printed == [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(printed) == 2 * 3                 # per E: dense, loop, bmm
    _check(printed, 1, {"dense", "moetrain"})
    assert [r["impl"] for r in printed[:3]] == [None, "loop", "bmm"]     # cpu's `all` is loop,bmm
    assert "x dense" in stdout and "TFLOP/s" in stdout                   # the table


def test_dropless_flag(bench, capsys):
    bench.main([*TINY, "--systems", "moetrain", "--impl", "loop", "--capacity-factor", "none", "--experts", "4"])
    (rec,) = _records(capsys.readouterr().out)
    assert rec["capacity_factor"] is None and rec["drop_frac"] == 0.0
    assert rec["expert_rows"] == 64 * 2 and rec["expert_rows_from"] == "kept" and rec["tflops"] > 0


def test_bad_flags_exit_with_one_line(bench):
    with pytest.raises(SystemExit, match="not divisible"):
        bench.main([*TINY, "--world", "3"])
    with pytest.raises(SystemExit, match="unknown"):
        bench.main([*TINY, "--systems", "megablocks"])
    with pytest.raises(SystemExit, match="--backend nccl needs --device cuda"):
        bench.main([*TINY, "--backend", "nccl"])


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
    assert ours["backend"] == "gloo"


def test_world2_backend_gloo_makes_its_own_group(bench, tmp_path):
    """--backend gloo: the tool creates the "cpu:gloo,cuda:gloo" group itself (what cuda ranks
    sharing a GPU use) and init_parallel builds the mesh on it."""
    out_file = tmp_path / "bench.jsonl"
    bench.main([*TINY, "--systems", "moetrain", "--impl", "loop", "--world", "2", "--experts", "4",
                "--backend", "gloo", "--json", str(out_file)])
    (rec,) = _records(out_file.read_text())
    assert rec["backend"] == "cpu:gloo,cuda:gloo" and rec["a2a_ms"] > 0 and rec["tflops"] > 0


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


# ----------------------------------------------------------------------------- --device cuda, dry-run on the CPU


def test_grouped_impl_on_cpu(bench, capsys):
    """torch._grouped_mm runs on CPU (bf16 inside moetrain's grouped path); --impl takes a list."""
    assert bench.main([*TINY, "--systems", "dense,moetrain", "--impl", "grouped,loop"]) == 0
    printed = _records(capsys.readouterr().out)
    _check(printed, 1, {"dense", "moetrain"})
    assert [r["impl"] for r in printed if r["system"] == "moetrain"] == ["grouped", "loop"] * 2


def test_grouped_skipped_with_a_reason(bench, capsys, monkeypatch):
    """Sizes _grouped_mm cannot take (not multiples of 8) skip the impl with a printed line; so does
    a kernel refusal (RuntimeError) in the trial run."""
    bench.main([*TINY, "--dim", "12", "--hidden", "20", "--systems", "moetrain", "--impl", "grouped,loop",
                "--experts", "4"])
    out = capsys.readouterr().out
    assert "skipping moetrain impl grouped" in out and "multiples of 8" in out and "dim 12, hidden 20" in out
    assert [r["impl"] for r in _records(out)] == ["loop"]

    def refuse(*a, **kw):
        raise RuntimeError("strides should be multiple of 16 bytes\nmore")
    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    args = bench.parse_args([*TINY])
    bench.validate(args)
    why = bench.grouped_skip_reason(bench.Ctx(args, 0, 1, None, None))
    assert why == "torch._grouped_mm refused dim 16, hidden 32 on cpu: strides should be multiple of 16 bytes"


def test_device_defaults_and_impls(bench):
    cpu = bench.parse_args([])
    assert (cpu.device, cpu.tokens, cpu.dim, cpu.hidden, cpu.k, cpu.experts, cpu.warmup, cpu.iters) == \
        ("cpu", 4096, 256, 512, 2, [8, 32, 128], 2, 5)
    assert bench.impls_of(cpu) == ["loop", "bmm"]
    gpu = bench.parse_args(["--device", "cuda"])
    assert (gpu.tokens, gpu.dim, gpu.hidden, gpu.k, gpu.experts, gpu.warmup, gpu.iters) == \
        (16384, 2048, 1408, 2, [8, 32, 128], 3, 10)
    assert bench.impls_of(gpu) == ["grouped", "bmm", "loop"]
    given = bench.parse_args(["--device", "cuda", "--tokens", "100", "--dim", "64", "--k", "8", "--experts", "128",
                              "--impl", "grouped"])
    assert (given.tokens, given.dim, given.hidden, given.k, given.experts) == (100, 64, 1408, 8, [128])
    assert bench.impls_of(given) == ["grouped"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--impl", "cutlass"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(bench):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        bench.main(["--device", "cuda"])
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cuda"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().startswith("--device cuda: no CUDA device is available")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cuda_world2_needs_an_explicit_backend(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = ["--device", "cuda", "--world", "2", "--experts", "4"]
    with pytest.raises(SystemExit, match="pass --backend gloo"):
        bench.validate(bench.parse_args(base))
    with pytest.raises(SystemExit, match="one GPU per rank: 2 ranks on this node, 1 GPU"):
        bench.validate(bench.parse_args([*base, "--backend", "nccl"]))
    bench.validate(bench.parse_args([*base, "--backend", "gloo"]))
    bench.validate(bench.parse_args(["--device", "cuda", "--experts", "4"]))      # world 1: no backend needed


def test_ds_accelerator_follows_device(bench, monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    bench.main([*TINY, "--systems", "moetrain", "--impl", "loop", "--experts", "4"])
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--device", "cuda"])
        assert os.environ["DS_ACCELERATOR"] == "cuda"


class FakeCuda:
    """CUDA events and synchronize for a dry run: an event can be read only after a later
    synchronize; every read is logged with the sync epochs its two events were recorded in."""

    def __init__(self):
        self.syncs = 0
        self.reads: list[tuple[int, int]] = []
        fake = self

        class Event:
            def record(self):
                self.t, self.epoch = time.perf_counter(), fake.syncs

            def elapsed_time(self, other):
                assert fake.syncs > max(self.epoch, other.epoch), "event read before a synchronize"
                fake.reads.append((self.epoch, other.epoch))
                return (other.t - self.t) * 1e3

        self.Event = Event

    def synchronize(self):
        self.syncs += 1

    def make_runtime(self, bench):
        """bench.make_runtime's cuda branch on the CPU: blocks, bf16 autocast, fake events."""
        def make_runtime(args, local_rank):
            dev = torch.device("cpu")
            clock = bench.EventClock(dev, event=self.Event, synchronize=self.synchronize)
            return bench.Runtime(dev, clock, blocks=True, amp_dtype=torch.bfloat16, gpu=FAKE_GPU)
        return make_runtime


def test_cuda_schedule_dry_run(bench, monkeypatch, capsys):
    """The cuda path with CPU autocast and fake events: one block per system, every timed step's
    events read after the block's one synchronize (never per step), bf16 for all impls."""
    fake = FakeCuda()
    monkeypatch.setattr(bench, "make_runtime", fake.make_runtime(bench))
    iters = 3
    assert bench.main([*TINY, "--iters", str(iters), "--systems", "dense,moetrain", "--impl", "grouped,bmm,loop"]) == 0
    printed = _records(capsys.readouterr().out)
    _check(printed, 1, {"dense", "moetrain"}, gpu=FAKE_GPU)
    assert [r["impl"] for r in printed[:4]] == [None, "grouped", "bmm", "loop"]
    blocks = len(printed)
    assert len(fake.reads) == 2 * iters * blocks                       # total and forward, per timed step
    assert all(a == b for a, b in fake.reads)                           # no synchronize inside a step...
    assert len({a for a, _ in fake.reads}) == blocks                    # ...nor between a block's steps


DRIVER = """
import sys
sys.path[:0] = [{tools!r}, {tests!r}]
import bench_moe, test_bench_moe
fake = test_bench_moe.FakeCuda()
bench_moe.make_runtime = fake.make_runtime(bench_moe)
sys.exit(bench_moe.main(sys.argv[1:]))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_cuda_schedule_dry_run_deepspeed_subprocess():
    """DeepSpeed on the cuda path (bf16 autocast, fp32 gate, moved to the device after the weight
    copy, kept rows from an untimed forward), dry-run on the CPU."""
    code = DRIVER.format(tools=TOOLS, tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--systems", "dense,moetrain,deepspeed",
                           "--impl", "loop", "--experts", "8"],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if "deepspeed is not importable" in proc.stdout:
        pytest.skip(proc.stdout.splitlines()[1])
    printed = _records(proc.stdout)
    _check(printed, 1, {"dense", "moetrain", "deepspeed"}, gpu=FAKE_GPU)
    ours, ds = (next(r for r in printed if r["system"] == s) for s in ("moetrain", "deepspeed"))
    assert ds["expert_rows"] == ours["expert_rows"]       # same weights, both route in fp32: same kept copies
