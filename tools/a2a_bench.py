#!/usr/bin/env python
"""All-to-all benchmark in the spirit of nccl-tests' alltoall_perf, with MoE-shaped splits.

    python tools/a2a_bench.py --world 4                          # spawns 4 gloo ranks on CPU
    torchrun --nproc_per_node 8 tools/a2a_bench.py               # NCCL on 8 GPUs, 1 KiB..256 MiB
    python tools/a2a_bench.py --world 4 --backend gloo           # 4 ranks sharing the GPU(s): gloo on CUDA
    srun -n 16 python tools/a2a_bench.py / mpiexec -n 4 python tools/a2a_bench.py
    python tools/a2a_bench.py --world 2 --min-bytes 1K --max-bytes 256M --splits uniform,zipf,hot
    python tools/a2a_bench.py --plot w2/a2a_bench.jsonl w4/a2a_bench.jsonl --png docs/img/a2a_bench.png

Size = bytes each rank SENDS per all-to-all (nccl-tests' "size" for alltoall), swept from
--min-bytes to --max-bytes by factors of --step-factor (default 1 KiB .. 256 MiB on GPU; on CPU
the default top is 16 MiB to keep a laptop run short; --max-bytes 256M works there too).

Split patterns (every rank sends the same number of bytes; who receives them differs):
  uniform  size/n bytes to every rank: plain alltoall (no split lists), nccl-tests' pattern
  zipf     tokens pick experts with P(e) ~ 1/(e+1)^s (--zipf-s), experts laid out contiguously
           over ranks (rank r holds experts [r*E/n, (r+1)*E/n), as moetrain does), so the ranks
           holding the popular experts receive most: all_to_all_single with uneven splits
  hot      one hot expert (--hot-expert, on rank 0 by default) takes --hot-frac of every rank's
           tokens, the rest spread evenly over all experts
Metrics (nccl-tests conventions):
  time     each rank times --iters calls one by one (after --warmup) and takes the median call
           (robust to other tenants of a shared machine); time_us is the mean of the ranks'
           medians, time_min_us / time_max_us the fastest / slowest rank's
  algbw    size / time_us                        (GB/s, 1 GB = 1e9 B)
  busbw    algbw * (n-1)/n: the bytes that actually cross between ranks, comparable to link
           speed. Nominal for skewed splits, whose slowest rank is bounded by its
           recv_max_bytes instead (reported, with recv_imbalance = max / mean received)
Iterations adapt to large sizes: after the warmup all ranks agree (max over ranks) on the time
per call and run at most --max-seconds worth of calls per size (never fewer than 2).

Output: a table on stdout (rank 0); one JSON object per (splits, size) in OUT/a2a_bench.jsonl;
a PNG (latency and bus bandwidth against size, one line per split pattern, min..max over ranks
shaded) in OUT/a2a_bench.png. --plot re-plots one or more JSONL files into one PNG (e.g. world
2 and 4 side by side). Every call's data is checked once per size (--no-check to skip).

Backend (--backend, as moetrain's parallel.backend): auto = NCCL on CUDA, gloo on CPU; gloo on
CUDA is torch's "cuda:gloo" (payloads staged through host memory, so several ranks may share one
GPU; the JSON's "backend" then reads "cuda:gloo"). Every tensor handed to a collective, the
bookkeeping ones included (warmup time, per-rank results), lives on the rank's device, as NCCL
requires; results are read back to the host only outside the timed calls.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tools._local_ranks import exit_now, free_port, run_local_ranks  # noqa: E402

PATTERNS = ("uniform", "zipf", "hot")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.int8}


# ----------------------------------------------------------------------------- arguments

def parse_bytes(v: str) -> int:
    """'1024', '1K', '64KiB', '256M', '1G' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", v, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {v!r} (e.g. 1K, 64KiB, 256M)")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="a2a_bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn when not launched by torchrun/srun/mpiexec")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cuda (NCCL) when GPUs are visible, else cpu (gloo)")
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                    help="process group backend (as parallel.backend): auto = nccl on CUDA, gloo on CPU; "
                         "gloo on CUDA lets several ranks share one GPU")
    ap.add_argument("--min-bytes", type=parse_bytes, default=parse_bytes("1K"), help="smallest per-rank send size")
    ap.add_argument("--max-bytes", type=parse_bytes, default=None,
                    help="largest per-rank send size (default 256M on GPU, 16M on CPU)")
    ap.add_argument("--step-factor", type=int, default=4, help="size multiplier between rows (nccl-tests -f)")
    ap.add_argument("--splits", default="uniform,zipf,hot", help="comma list of " + ", ".join(PATTERNS))
    ap.add_argument("--experts-per-rank", type=int, default=8, help="experts per rank for zipf/hot")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent for --splits zipf")
    ap.add_argument("--hot-frac", type=float, default=0.5, help="share of tokens the hot expert takes")
    ap.add_argument("--hot-expert", type=int, default=0, help="global index of the hot expert")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=2.0, help="time budget per size for the timed calls")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    ap.add_argument("--out", default="bench_out/a2a", help="directory for a2a_bench.jsonl and a2a_bench.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the one-call data check per size")
    ap.add_argument("--plot", nargs="+", metavar="JSONL", help="only plot these result files, then exit")
    ap.add_argument("--png", default=None, help="PNG path for --plot (default OUT/a2a_bench.png)")
    return ap


def validate(args) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SystemExit(f"a2a_bench: error: {msg}")
    if args.plot:
        return
    need(args.world >= 1, f"--world {args.world}: must be >= 1")
    need(args.min_bytes >= 1, f"--min-bytes {args.min_bytes}: must be >= 1")
    if args.max_bytes is not None:
        need(args.max_bytes >= args.min_bytes, f"--max-bytes {args.max_bytes} < --min-bytes {args.min_bytes}")
    need(args.step_factor >= 2, f"--step-factor {args.step_factor}: must be >= 2")
    bad = [p for p in args.splits.split(",") if p not in PATTERNS]
    need(not bad, f"--splits: unknown pattern(s) {bad}; allowed: {', '.join(PATTERNS)}")
    need(0.0 <= args.hot_frac <= 1.0, f"--hot-frac {args.hot_frac}: must be in [0, 1]")
    need(args.experts_per_rank >= 1, f"--experts-per-rank {args.experts_per_rank}: must be >= 1")
    need(args.iters >= 1 and args.warmup >= 0, "--iters must be >= 1 and --warmup >= 0")
    need(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: no GPU is visible")
    if args.backend == "nccl":
        need(args.device != "cpu", "--backend nccl needs CUDA, but --device cpu was given")
        need(torch.cuda.is_available(), "--backend nccl needs CUDA, but no GPU is visible")


# ----------------------------------------------------------------------------- split math (pure)

def rank_shares(pattern: str, world: int, experts_per_rank: int = 8, zipf_s: float = 1.0,
                hot_frac: float = 0.5, hot_expert: int = 0) -> list[float]:
    """Fraction of every rank's traffic that goes to each destination rank (sums to 1).

    Expert probabilities p_e, summed over the experts each rank holds (contiguous blocks):
      uniform: p_e = 1/E;  zipf: p_e ~ (e+1)^-s;  hot: p_e = hot_frac*[e == hot] + (1-hot_frac)/E
    """
    E = world * experts_per_rank
    if pattern == "uniform":
        p = [1.0 / E] * E
    elif pattern == "zipf":
        w = [(e + 1) ** -zipf_s for e in range(E)]
        p = [x / sum(w) for x in w]
    elif pattern == "hot":
        p = [(1.0 - hot_frac) / E] * E
        p[hot_expert % E] += hot_frac
    else:
        raise ValueError(f"unknown split pattern {pattern!r}")
    return [sum(p[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(world)]


def split_counts(total: int, shares: list[float]) -> list[int]:
    """Integer split of `total` elements with these shares (largest remainder; sums to total)."""
    raw = [total * s for s in shares]
    out = [int(math.floor(x)) for x in raw]
    order = sorted(range(len(shares)), key=lambda i: (out[i] - raw[i], i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def send_matrix(pattern: str, world: int, count: int, **kw) -> list[list[int]]:
    """S[src][dst] = elements src sends to dst; every row sums to `count`. Uniform splits are
    exact (count is a multiple of world); skewed ones use the same shares on every source."""
    if pattern == "uniform":
        return [[count // world] * world for _ in range(world)]
    row = split_counts(count, rank_shares(pattern, world, **kw))
    return [list(row) for _ in range(world)]


def bus_bandwidth(algbw: float, world: int) -> float:
    """nccl-tests alltoall: busbw = algbw * (n-1)/n."""
    return algbw * (world - 1) / world


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= factor
    return out


# ----------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tag(src: int, dst: int, world: int) -> int:
    return (src * world + dst) % 97 + 1     # exact in every DTYPES entry


def _host_values(t: torch.Tensor) -> list:
    """A small result tensor as Python numbers: one device-to-host copy (a sync on CUDA). Only
    ever called outside the timed calls."""
    return t.cpu().tolist()


def _max_over_ranks(value: float, world: int, group, device: torch.device) -> float:
    """max of `value` over the group's ranks; the tensor lives on `device` (NCCL takes no CPU
    tensors)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return _host_values(t)[0]


def _check_call(S, rank, world, dtype, device, group, uniform: bool) -> None:
    """One all-to-all whose payload names (source, destination): rank r must receive S[src][r]
    elements tagged (src, r) from every src, in source order."""
    send_splits = S[rank]
    recv_splits = [S[src][rank] for src in range(world)]

    def tagged(pairs):
        return torch.cat([torch.full((n,), _tag(a, b, world), dtype=dtype, device=device) for (a, b), n in pairs])
    send = tagged(((rank, dst), n) for dst, n in enumerate(send_splits))
    recv = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    if uniform:
        dist.all_to_all_single(recv, send, group=group)
    else:
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    expect = tagged(((src, rank), n) for src, n in enumerate(recv_splits))
    if not torch.equal(recv, expect):
        raise RuntimeError(f"a2a_bench: rank {rank} received wrong data ({sum(recv_splits)} elements)")


def measure(pattern: str, size: int, args, rank: int, world: int, device: torch.device, group) -> Optional[dict]:
    """Time one (pattern, size) on every rank; returns the row on rank 0, None elsewhere."""
    dtype = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    count = max(world, size // esize // world * world)   # elements sent per rank
    nbytes = count * esize
    S = send_matrix(pattern, world, count, experts_per_rank=args.experts_per_rank, zipf_s=args.zipf_s,
                    hot_frac=args.hot_frac, hot_expert=args.hot_expert)
    uniform = pattern == "uniform"
    send_splits = S[rank]
    recv_splits = [S[src][rank] for src in range(world)]
    send = torch.ones(count, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_splits), dtype=dtype, device=device)

    def call():
        if uniform:
            dist.all_to_all_single(recv, send, group=group)
        else:
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)

    if not args.no_check:
        _check_call(S, rank, world, dtype, device, group, uniform)
    # warmup (at least one call, timed, so every rank agrees on how many timed calls fit)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(max(1, args.warmup)):
        call()
    _sync(device)
    per_call = _max_over_ranks((time.perf_counter() - t0) / max(1, args.warmup), world, group, device)
    iters = min(args.iters, max(2, int(args.max_seconds / max(1e-9, per_call))))

    dist.barrier(group=group)
    per_call_s = _timed_calls(call, iters, device)
    mine = sorted(per_call_s)[len(per_call_s) // 2]
    times = _gather_floats([mine, float(sum(recv_splits) * esize)], world, group, device)
    if rank != 0:
        return None
    t_rank = [t for t, _ in times]
    recv_bytes = [b for _, b in times]
    t = sum(t_rank) / world
    algbw = nbytes / t / 1e9
    mean_recv = sum(recv_bytes) / world
    return {"splits": pattern, "size_bytes": nbytes, "count": count, "dtype": args.dtype, "world": world,
            "backend": dist.get_backend(group), "device": device.type, "iters": iters,
            "time_us": t * 1e6, "time_min_us": min(t_rank) * 1e6, "time_max_us": max(t_rank) * 1e6,
            "algbw_gbs": algbw, "busbw_gbs": bus_bandwidth(algbw, world),
            "algbw_min_gbs": nbytes / max(t_rank) / 1e9, "algbw_max_gbs": nbytes / min(t_rank) / 1e9,
            "recv_max_bytes": int(max(recv_bytes)), "recv_imbalance": max(recv_bytes) / mean_recv,
            "time_us_per_rank": [round(x * 1e6, 2) for x in t_rank]}


def _timed_calls(call, iters: int, device: torch.device) -> list[float]:
    """Seconds per call. CPU: wall clock around each (blocking) gloo call. CUDA: events recorded
    on the stream between consecutive calls, resolved once at the end (no per-call host sync)."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for i in range(iters):
            call()
            events[i + 1].record()
        events[-1].synchronize()
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(iters)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def _gather_floats(vals: list[float], world: int, group, device: torch.device) -> list[list[float]]:
    """Every rank's `vals`, in rank order; gathered on `device` (NCCL takes no CPU tensors) and
    read back with one host copy."""
    if world == 1:
        return [vals]
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return _host_values(torch.stack(out))


HEADER = (f"{'splits':<8} {'size':>8} {'count':>10} {'iters':>5} {'time(us)':>11} {'min(us)':>11} "
          f"{'max(us)':>11} {'algbw':>8} {'busbw':>8} {'recv_imb':>8}")


def format_row(r: dict) -> str:
    return (f"{r['splits']:<8} {fmt_bytes(r['size_bytes']):>8} {r['count']:>10} {r['iters']:>5} "
            f"{r['time_us']:>11.1f} {r['time_min_us']:>11.1f} {r['time_max_us']:>11.1f} "
            f"{r['algbw_gbs']:>8.3f} {r['busbw_gbs']:>8.3f} {r['recv_imbalance']:>8.2f}")


def rank_main(args, rank: int, world: int) -> None:
    from moetrain.parallel.mesh import init_parallel, read_launch_env, shutdown
    torch.set_num_threads(max(1, args.threads))
    env = read_launch_env()
    par = init_parallel(world, 1, 1, env, device_kind=args.device, backend=args.backend) if world > 1 else None
    if world == 1:   # a one-rank group still exercises the collective path
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        from moetrain.parallel.mesh import pick_device, process_group_backend
        device = pick_device(args.device, env.local_rank, args.backend)
        pg_backend = process_group_backend(args.backend, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(pg_backend, rank=0, world_size=1,
                                device_id=device if pg_backend == "nccl" else None)
    else:
        device = par.device
    group = dist.group.WORLD
    max_bytes = args.max_bytes or (256 * 2 ** 20 if device.type == "cuda" else 16 * 2 ** 20)
    rows = []
    out_path = os.path.join(args.out, "a2a_bench.jsonl")
    try:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            open(out_path, "w").close()
            print(f"# a2a_bench: world {world}, backend {dist.get_backend(group)}, device {device.type}, "
                  f"dtype {args.dtype}, sizes {fmt_bytes(args.min_bytes)}..{fmt_bytes(max_bytes)} x{args.step_factor}, "
                  f"warmup {args.warmup}, iters <= {args.iters} (<= {args.max_seconds}s per size), "
                  f"{args.experts_per_rank} experts/rank, zipf s={args.zipf_s}, hot {args.hot_frac:.0%} "
                  f"to expert {args.hot_expert}; time = mean over ranks, GB/s = 1e9 B/s", flush=True)
        for pattern in args.splits.split(","):
            if rank == 0:
                shares = rank_shares(pattern, world, args.experts_per_rank, args.zipf_s, args.hot_frac, args.hot_expert)
                print(f"\n# {pattern}: share of traffic received per rank {[round(s, 3) for s in shares]}", flush=True)
                print(HEADER, flush=True)
            for size in sizes(args.min_bytes, max_bytes, args.step_factor):
                r = measure(pattern, size, args, rank, world, device, group)
                if r is not None:
                    rows.append(r)
                    print(format_row(r), flush=True)
                    with open(out_path, "a") as f:
                        f.write(json.dumps(r) + "\n")
        if rank == 0:
            print(f"\n# results: {out_path}", flush=True)
            if not args.no_plot:
                png = os.path.join(args.out, "a2a_bench.png")
                plot([rows], png)
                print(f"# plot: {png}", flush=True)
    finally:
        if par is not None:
            shutdown()
        elif dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- plot

def plot(row_sets: list[list[dict]], png: str) -> None:
    """Latency (left) and bus bandwidth (right) against size; one column per world size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_world: dict[int, list[dict]] = {}
    for rows in row_sets:
        for r in rows:
            by_world.setdefault(r["world"], []).append(r)
    worlds = sorted(by_world)
    fig, axes = plt.subplots(2, len(worlds), figsize=(5.5 * len(worlds), 7.5), squeeze=False)
    colors = {"uniform": "tab:blue", "zipf": "tab:orange", "hot": "tab:red"}
    for col, w in enumerate(worlds):
        rows = by_world[w]
        ax_t, ax_b = axes[0][col], axes[1][col]
        for pattern in [p for p in PATTERNS if any(r["splits"] == p for r in rows)]:
            rs = sorted((r for r in rows if r["splits"] == pattern), key=lambda r: r["size_bytes"])
            x = [r["size_bytes"] for r in rs]
            c = colors.get(pattern)
            ax_t.plot(x, [r["time_us"] for r in rs], "o-", ms=3, color=c, label=pattern)
            ax_t.fill_between(x, [r["time_min_us"] for r in rs], [r["time_max_us"] for r in rs], color=c, alpha=0.2)
            ax_b.plot(x, [r["busbw_gbs"] for r in rs], "o-", ms=3, color=c, label=pattern)
            lo = [bus_bandwidth(r["algbw_min_gbs"], w) for r in rs]
            hi = [bus_bandwidth(r["algbw_max_gbs"], w) for r in rs]
            ax_b.fill_between(x, lo, hi, color=c, alpha=0.2)
        r0 = rows[0]
        ax_t.set_title(f"all-to-all, world {w} ({r0['backend']}, {r0['device']}, {r0['dtype']})")
        ax_t.set_ylabel("time per call (us), band = min..max rank")
        ax_b.set_ylabel("bus bandwidth (GB/s) = algbw (n-1)/n")
        for ax in (ax_t, ax_b):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes sent per rank")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            ticks = [r["size_bytes"] for r in rows if r["splits"] == rows[0]["splits"]]
            ax.set_xticks(ticks)
            ax.set_xticklabels([fmt_bytes(t) for t in ticks], rotation=45, fontsize=7)
        ax_t.set_yscale("log")
        ax_b.set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- launch

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.plot:
        png = args.png or os.path.join(args.out, "a2a_bench.png")
        plot([read_jsonl(p) for p in args.plot], png)
        print(f"a2a_bench: plot {png}")
        return 0
    from moetrain.parallel.mesh import read_launch_env
    env = read_launch_env()
    if env.world_size > 1 or args.world == 1:   # torchrun / srun / mpiexec, or one rank here
        rank_main(args, env.rank, env.world_size)
        exit_now(0)
    check_local_gpus(args)
    run_local_ranks(rank_main, args, args.world)
    return 0


def check_local_gpus(args) -> None:
    """Ranks spawned here on CUDA: NCCL needs a GPU per rank (gloo on CUDA may share them)."""
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if on_cuda and args.backend != "gloo":
        n = torch.cuda.device_count()
        if args.world > n:
            raise SystemExit(f"a2a_bench: error: --world {args.world} ranks on {n} visible GPU(s): NCCL needs "
                             "one GPU per rank; add --backend gloo to let ranks share GPUs")


if __name__ == "__main__":
    sys.exit(main())
