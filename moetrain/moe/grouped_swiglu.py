"""SwiGLU over contiguous per-expert row slices as ONE autograd node (the CPU/fp32 `loop` path).

    y[s_e] = (silu(x[s_e] @ w1[e]) * (x[s_e] @ w3[e])) @ w2[e]      for each local expert e

Why a hand-written backward: with one autograd node per expert matmul, a step with L experts
builds ~9L nodes, and the weight gradients come back as L small tensors that autograd stacks
(or, with `w[e]` indexing, adds into L full-size zero tensors). Here every output and gradient
is written in place (`mm(out=...)`) into one preallocated [N, D] / [L, D, H] buffer.

On CPU with several intra-op threads and many small experts, whole experts are spread over a
small thread pool with ONE intra-op thread each: a GEMM of ~64 rows does not split well over
cores, but 64 independent experts do. Each expert is always computed by a single thread with
the same kernels, so results do not depend on how experts are spread.

Saved for backward: x, a = x w1, b = x w3 (silu(a) and the product are recomputed).
Shape legend: N rows, D model dim, H expert hidden, L local experts.
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# spread experts over threads when the average expert gets at most this many rows (grouped_swiglu
# fwd+bwd alone, 2 cores, D=256, H=512, 8192 rows, random counts, medians of two runs: spread vs
# threaded GEMMs at 64 rows/expert (E=128) 180-187 vs 213-222 ms, at 128 (E=64) 141-144 vs
# 158-160, at 256 (E=32) 131-146 vs 144-150; at 1024 (E=8) spreading loses, 171-183 vs 143 ms)
SPREAD_MAX_ROWS_PER_EXPERT = 256

_POOLS: dict[int, cf.ThreadPoolExecutor] = {}


def _pool(workers: int) -> cf.ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = cf.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="moetrain-experts",
            initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]


def expert_ranges(counts_L: list[int], parts: int) -> list[tuple[int, int, int]]:
    """Split experts into <= `parts` contiguous ranges of about equal rows: [(e0, e1, row0), ...]."""
    total = sum(counts_L)
    ranges, e0, row0, acc = [], 0, 0, 0
    for p in range(parts):
        target = total * (p + 1) / parts
        e1 = e0
        while e1 < len(counts_L) and (e1 == e0 or p == parts - 1 or acc + counts_L[e1] <= target):
            acc += counts_L[e1]
            e1 += 1
        if e1 > e0:
            ranges.append((e0, e1, row0))
        row0, e0 = acc, e1
    return ranges


def _threads_for(x: torch.Tensor, counts_L: list[int], spread: Optional[bool]) -> int:
    if x.device.type != "cpu" or spread is False:
        return 1
    threads = torch.get_num_threads()
    busy = sum(1 for n in counts_L if n)
    if threads < 2 or busy < 2:
        return 1
    if spread is None and sum(counts_L) > SPREAD_MAX_ROWS_PER_EXPERT * busy:
        return 1
    return min(threads, busy)


def _run(work: Callable[[int, int, int], None], counts_L: list[int], threads: int) -> None:
    """work(e0, e1, row0) over all experts: inline, or spread over `threads` single-threaded workers."""
    if threads <= 1:
        work(0, len(counts_L), 0)
        return
    ranges = expert_ranges(counts_L, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)     # MKL/OpenMP thread counts are process-wide: no oversubscription

    def job(r):
        with torch.no_grad():    # grad mode is thread-local; pool threads start with it enabled
            work(*r)
    try:
        for f in [_pool(threads).submit(job, r) for r in ranges]:
            f.result()
    finally:
        torch.set_num_threads(before)


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1, w3, w2, counts_L, spread):
        N, D = x_ND.shape
        H = w1.shape[2]
        x_ND = x_ND.contiguous()
        y_ND = x_ND.new_empty(N, D)
        a_NH, b_NH = x_ND.new_empty(N, H), x_ND.new_empty(N, H)

        def work(e0, e1, s):
            for e in range(e0, e1):
                n = counts_L[e]
                if n == 0:
                    continue
                x, a, b = x_ND[s:s + n], a_NH[s:s + n], b_NH[s:s + n]
                torch.mm(x, w1[e], out=a)
                torch.mm(x, w3[e], out=b)
                torch.mm(F.silu(a).mul_(b), w2[e], out=y_ND[s:s + n])
                s += n

        threads = _threads_for(x_ND, counts_L, spread)
        _run(work, counts_L, threads)
        ctx.counts_L, ctx.threads = counts_L, threads
        ctx.save_for_backward(x_ND, w1, w3, w2, a_NH, b_NH)
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):
        x_ND, w1, w3, w2, a_NH, b_NH = ctx.saved_tensors
        counts_L = ctx.counts_L
        gy_ND = gy_ND.contiguous()
        gx_ND = torch.empty_like(x_ND)
        gw1, gw3, gw2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)

        def work(e0, e1, s):
            for e in range(e0, e1):
                n = counts_L[e]
                if n == 0:
                    gw1[e].zero_()
                    gw3[e].zero_()
                    gw2[e].zero_()
                    continue
                x, gy, a, b = x_ND[s:s + n], gy_ND[s:s + n], a_NH[s:s + n], b_NH[s:s + n]
                sa = F.silu(a)
                torch.mm((sa * b).t(), gy, out=gw2[e])
                gh = gy @ w2[e].t()
                gb = gh * sa                                             # d/d(x w3)
                ga = torch.ops.aten.silu_backward(gh.mul_(b), a)         # d/d(x w1)
                torch.mm(x.t(), ga, out=gw1[e])
                torch.mm(x.t(), gb, out=gw3[e])
                gx = gx_ND[s:s + n]
                torch.mm(ga, w1[e].t(), out=gx)
                gx.addmm_(gb, w3[e].t())
                s += n

        _run(work, counts_L, ctx.threads)
        return gx_ND, gw1, gw3, gw2, None, None


def grouped_swiglu(x_ND: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts_L: list[int], spread: Optional[bool] = None) -> torch.Tensor:
    """Rows of x_ND sorted by local expert, counts_L[e] rows each -> [N, D] expert outputs.

    spread: None = spread experts over CPU threads when they are small (see module doc),
    True/False = always/never. Ignored off CPU.
    """
    if sum(counts_L) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts_L)} but x has {x_ND.shape[0]} rows")
    return _GroupedSwiGLU.apply(x_ND, w1, w3, w2, list(counts_L), spread)
