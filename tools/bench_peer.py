#!/usr/bin/env python
"""PEER scaling benchmark: time per token vs number of experts N = n^2 (single process).

    python tools/bench_peer.py [--keys 128,256,512,1024] [--tokens 512] [--dim 256]

For each n: forward time (product-key retrieval + expert compute), retrieval alone, a brute-force
retrieval over all N keys for contrast (skipped above --brute-max), and forward+backward. With
product keys the forward cost grows with sqrt(N) = n (scoring 2 x n sub-keys per head), not N.
Backward with dense gradients also writes an [N, D] gradient for each expert table, which is
O(N) memory traffic: reported separately so the two effects are visible.
Prints a table and one JSON line per N.

    python tools/bench_peer.py --train [--keys 128,256,512,1024] [--tokens 512] [--dim 128]

--train times the full training step of one PEER layer instead (forward, backward, the global
gradient norm and clipping of parallel/grads.py, the optimizer step) at fixed tokens, with
sparse table updates (moe.peer.sparse_updates: sparse row gradients + LazyAdamW) and with dense
ones (dense [N, D] gradients + AdamW), both on the row-gathering path, and the growth of each
against the smallest N. The first step of each (optimizer state creation) is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moetrain.moe.peer import PEERLayer, brute_force_topk  # noqa: E402


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def bench(n: int, args) -> dict:
    torch.manual_seed(0)
    layer = PEERLayer(args.dim, n, args.heads, args.top_k, args.key_dim, query_bn=True)
    layer.dense_scoring = False      # the retrieval path whose cost is O(sqrt N), at every N
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, args.tokens, args.dim)
    x_TD = x[0]
    with torch.no_grad():
        fwd = _time(lambda: layer(x), args.warmup, args.iters)
        retrieve = _time(lambda: layer.retrieve(x_TD), args.warmup, args.iters)
        brute = None
        if n * n <= args.brute_max:
            q = layer.query_bn(layer.query(x_TD)).view(args.tokens, args.heads, 2, args.key_dim // 2)
            brute = _time(lambda: brute_force_topk(q[:, :, 0], q[:, :, 1], layer.keys1, layer.keys2, args.top_k),
                          1, max(1, args.iters // 2))
    xg = x.clone().requires_grad_(True)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        layer(xg).sum().backward()
    fb = _time(fwd_bwd, 1, args.iters)
    table_mb = 2 * layer.num_experts * args.dim * 4 / 2 ** 20
    return {"system": "moetrain-peer", "num_keys": n, "experts": n * n, "tokens": args.tokens, "dim": args.dim,
            "heads": args.heads, "top_k": args.top_k, "fwd_ms": fwd, "retrieve_ms": retrieve,
            "brute_retrieve_ms": brute, "fwd_bwd_ms": fb, "fwd_us_per_token": fwd * 1e3 / args.tokens,
            "table_mb": table_mb}


def bench_train(n: int, sparse: bool, args) -> dict:
    from moetrain.parallel.grads import clip_grad_norm
    from moetrain.train.lazy_adam import LazyAdamW
    torch.manual_seed(0)
    layer = PEERLayer(args.dim, n, args.heads, args.top_k, args.key_dim, query_bn=True)
    layer.dense_scoring = False
    layer.sparse_grads = sparse
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    tables = [layer.expert_down, layer.expert_up]
    others = [p for p in layer.parameters() if all(p is not t for t in tables)]
    groups = [{"params": [p for p in layer.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in layer.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = (LazyAdamW if sparse else torch.optim.AdamW)(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randn(1, args.tokens, args.dim)
    G = torch.randn(1, args.tokens, args.dim)
    parts = {"fwd_bwd": [], "clip": [], "opt": []}

    def step():
        t0 = time.perf_counter()
        (layer(x) * G).sum().backward()
        if sparse:        # what GradientSync.finish does at world 1 (SparseRowSum: coalesce)
            for t in tables:
                t.grad = t.grad.coalesce()
        t1 = time.perf_counter()
        clip_grad_norm(others, tables, 1.0, None, 1)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    for _ in range(max(1, args.warmup)):     # the first creates the optimizer state (O(N) once)
        step()
    total = []
    for _ in range(args.iters):
        a, b, c = step()
        for k, v in zip(parts, (a, b, c)):
            parts[k].append(v)
        total.append(a + b + c)
    # min: the machine is shared, and other work only ever adds time (median kept beside it)
    med = {k: min(v) * 1e3 for k, v in parts.items()}
    return {"system": "moetrain-peer-train", "mode": "sparse" if sparse else "dense", "num_keys": n,
            "experts": n * n, "tokens": args.tokens, "dim": args.dim, "heads": args.heads, "top_k": args.top_k,
            "step_ms": min(total) * 1e3, "step_median_ms": statistics.median(total) * 1e3,
            "fwd_bwd_ms": med["fwd_bwd"], "clip_ms": med["clip"], "opt_ms": med["opt"], "table_mb": 2 * n * n * args.dim * 4 / 2 ** 20}


def main_train(args) -> int:
    rows = []
    for n in (int(k) for k in args.keys.split(",")):
        for sparse in (True, False):
            rows.append(bench_train(n, sparse, args))
            print(json.dumps(rows[-1]), flush=True)
    base = {r["mode"]: r["step_ms"] for r in rows if r["num_keys"] == rows[0]["num_keys"]}
    print("best of --iters steps (median beside it); fwd+bwd, clip, optim: best of each part")
    print(f"{'N':>9} {'sqrtN':>6} {'mode':>6} {'step ms':>9} {'median':>8} {'x first N':>9} {'fwd+bwd':>8} {'clip':>6} "
          f"{'optim':>8}")
    for r in rows:
        print(f"{r['experts']:>9} {r['num_keys']:>6} {r['mode']:>6} {r['step_ms']:>9.1f} {r['step_median_ms']:>8.1f} "
              f"{r['step_ms'] / base[r['mode']]:>9.2f} {r['fwd_bwd_ms']:>8.1f} {r['clip_ms']:>6.1f} {r['opt_ms']:>8.1f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="128,256,512,1024")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--key-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--brute-max", type=int, default=512 * 512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--train", action="store_true",
                    help="time the full training step (fwd, bwd, clip, optimizer), sparse vs dense updates")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        return main_train(args)
    rows = [bench(int(n), args) for n in args.keys.split(",")]
    print(f"{'N':>9} {'sqrtN':>6} {'fwd ms':>8} {'us/tok':>7} {'retrieve':>9} {'brute':>9} {'fwd+bwd':>9} {'tables MB':>9}")
    for r in rows:
        brute = f"{r['brute_retrieve_ms']:.1f}" if r["brute_retrieve_ms"] is not None else "-"
        print(f"{r['experts']:>9} {r['num_keys']:>6} {r['fwd_ms']:>8.1f} {r['fwd_us_per_token']:>7.1f} "
              f"{r['retrieve_ms']:>9.1f} {brute:>9} {r['fwd_bwd_ms']:>9.1f} {r['table_mb']:>9.0f}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
