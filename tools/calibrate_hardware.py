#!/usr/bin/env python
"""Calibrate a planner hardware file (configs/hardware/*.yaml) on THIS machine, and check the
planner's step-time model (moetrain/plan.step_time) against real training steps.

    python tools/calibrate_hardware.py --out configs/hardware/cpu_here.yaml            # worlds 1,2,4
    python tools/calibrate_hardware.py --out my.yaml --world 2                         # one world
    python tools/calibrate_hardware.py --out /tmp/q.yaml --quick                       # seconds (tests)
    python tools/calibrate_hardware.py --validate --hardware configs/hardware/cpu_here.yaml \\
        --worlds 1,2,4 --repeats 2 --steps 50 --warmup 10 --json /tmp/val.jsonl        # trains
    python tools/calibrate_hardware.py --report /tmp/val.jsonl --hardware configs/hardware/cpu_here.yaml

Calibration (per world W of --worlds: W gloo ranks spawned here, all measuring at once, each with
the intra-op threads the trainer gives it, cpu_runtime.threads_per_process(0, W), i.e. cores / W
and at least 1: on a 2-core machine world 4 runs 4 one-thread ranks on 2 cores), per rank:
  GEMM rate      fp32 matmuls at the config's shapes (attention projections, dense FFN, one
                 routed expert's rows T*K/E, head) in the three orientations of a training step
                 (x@W, g@W^T, x^T@g): FLOPs / seconds -> `bf16_tflops` (the field's name is the
                 schema's; here it is the fp32 rate, the dtype CPU training computes in)
  model compute  the config's world-1 Transformer, forward + CE loss + backward of one micro
                 batch at several micro batch sizes b (T = b*seq_len tokens); least squares
                 time(T) = n_layers * layer_overhead + FLOPs(T) / R with FLOPs(T) =
                 T * plan.flops_per_token: `compute_efficiency` = R / GEMM rate (everything a
                 layer does beyond its GEMMs that grows with tokens: softmax, norms, SwiGLU,
                 routing, gathers), `layer_overhead_ms` = the intercept per layer (per-op
                 dispatch costs that do not grow with tokens; the embedding/head/loss's share is
                 folded in)
  optimizer      torch AdamW (foreach, as train/optim.py builds it) + zero_grad over the model's
                 parameters: `optimizer_ns_per_param`
  collectives    (W > 1) gloo all_to_all_single (uniform, tools/a2a_bench.py's split and timing:
                 each rank times calls one by one and takes the median) and all_reduce at five
                 sizes (4 KiB: the latency; 1, 2, 4, 8 MiB: the bandwidth, least-squares slope); time = latency + off-rank bytes / bandwidth (a2a: size*(W-1)/W, the
                 bytes plan.A2ABytes.off_rank counts; all-reduce: ring wire bytes 2(W-1)/W*size):
                 `intra_node_GBps` (the a2a's), `collective_latency_us` (the a2a's intercept),
                 and the all-reduce's figures in `allreduce_GBps` (the planner uses
                 intra_node_GBps for every collective; the comment says how far apart they are)
The file's top-level figures are those of --reference-world (default the largest calibrated);
each calibrated world's figures go under `by_local_ranks` (plan.Hardware.for_ranks picks the
entry for the number of ranks sharing a node). efficiencies: comm_efficiency 1.0 (bandwidths are
measured, not nominal). Comments in the file say what was measured, how, when and under which
load (os.getloadavg and hypervisor steal during the measurement).

--validate trains every layout plan.enumerate_layouts accepts at each world (--modes, native by
default; engine native) with torchrun, --steps steps each, --repeats times interleaved (repeat 1 of
every layout, then repeat 2, ...), and records per run the median of max-over-ranks step_ms of
the steps after --warmup (metrics.jsonl, logging.every=1), min and max, the measured all-to-all
time, routing imbalance and the load. --report prints the table measured vs predicted
(tools/plan_layout.plan_rows with --device cpu and the run's micro batch), the error per layout and
both rank orders.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_REPO, os.path.join(_REPO, "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "tiny_cpu.yaml")


# ----------------------------------------------------------------------------- pure helpers

def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b*x -> (a, b). One point: a = 0."""
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def gemm_shapes(cfg, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count per layer-ish) of the forward matmuls x[M,K] @ W[K,N] a world-1 micro
    step of `tokens` tokens runs: q/k/v/o projections, the dense FFN or one routed expert's
    w1/w3/w2 (rows T*K/E per expert, times E experts), the head."""
    from moetrain import plan as P
    m, e = cfg.model, cfg.moe
    D = m.dim
    out = [(tokens, D, D, 4 * m.n_layers)]
    dense = sum(not P.is_moe_layer(cfg, i) for i in range(m.n_layers))
    if dense:
        out += [(tokens, D, m.ffn_hidden, 2 * dense), (tokens, m.ffn_hidden, D, dense)]
    moe = P.routed_moe_layers(cfg)
    if moe:
        E, K, H = e.num_ffn_experts, e.routed_top_k, cfg.expert_hidden
        rows = max(1, tokens * K // E)
        out += [(rows, D, H, 2 * E * moe), (rows, H, D, E * moe)]
    out.append((tokens, D, m.vocab_size, 1))
    return out


def median_result(results: list[dict]) -> dict:
    """Field-wise median of several calibration rounds of one world (numbers only; the rest from
    the first round); the compute efficiency recomputed from the medians."""
    out = dict(results[0])
    for k, v in results[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results)
    out["compute_efficiency"] = out["model_gflops"] / (out["gemm_tflops"] * 1e3)
    out["rounds"] = len(results)
    return out


def pick_reference(worlds: list[int], reference) -> int:
    return reference if reference is not None else max(worlds)


def hardware_dict(per_world: dict, reference: int, memory_gib: float, name: str) -> dict:
    """The YAML mapping (plan.Hardware's fields) from per-world measurements."""
    def fig(r: dict) -> dict:
        out = {"bf16_tflops": round(r["gemm_tflops"], 5),
               "compute_efficiency": round(r["compute_efficiency"], 4),
               "layer_overhead_ms": round(r["layer_overhead_ms"], 4),
               "optimizer_ns_per_param": round(r["optimizer_ns_per_param"], 3)}
        if r.get("a2a_GBps"):
            out["intra_node_GBps"] = round(r["a2a_GBps"], 4)
            out["collective_latency_us"] = round(r["a2a_latency_us"], 1)
            out["allreduce_GBps"] = round(r["allreduce_GBps"], 4)
            out["allreduce_latency_us"] = round(r["allreduce_latency_us"], 1)
        return out
    ref = per_world[reference]
    top = fig(ref)
    bw = top.get("intra_node_GBps") or next((fig(r)["intra_node_GBps"] for r in per_world.values()
                                             if r.get("a2a_GBps")), 1.0)
    data = {"name": name, "bf16_tflops": top["bf16_tflops"], "memory_gib": round(memory_gib, 1),
            "memory_reserve_gib": 1.0, "intra_node_GBps": bw, "inter_node_GBps": bw,
            "compute_efficiency": top["compute_efficiency"], "comm_efficiency": 1.0,
            "layer_overhead_ms": top["layer_overhead_ms"],
            "optimizer_ns_per_param": top["optimizer_ns_per_param"],
            "collective_latency_us": top.get("collective_latency_us", 0.0),
            "allreduce_GBps": top.get("allreduce_GBps"), "allreduce_latency_us": top.get("allreduce_latency_us"),
            "by_local_ranks": {int(w): fig(r) for w, r in sorted(per_world.items())}}
    return data


def render_yaml(data: dict, per_world: dict, meta: dict) -> str:
    """The hardware file with comments: what, how, when, under what load."""
    import yaml
    lines = [f"# {data['name']}: calibrated by tools/calibrate_hardware.py on {meta['when']} "
             f"({meta['host_cores']} cores visible, torch {meta['torch']}, config {meta['config']}).",
             "# Measured per rank with W ranks of this machine running at once, each with the trainer's",
             "# intra-op threads (cpu_runtime.threads_per_process: cores / W, at least 1); the top-level",
             f"# figures are world {meta['reference']}'s, by_local_ranks holds each world's (the planner picks",
             "# the entry for the ranks sharing a node). fp32 throughout (CPU training runs fp32):",
             "#   bf16_tflops            fp32 GEMM rate at the config's matmul shapes (fwd x@W, g@W^T, x^T@g)",
             "#   compute_efficiency     model rate / GEMM rate, from a least-squares fit of the world-1 model's",
             "#                          forward+loss+backward time over micro batches: t = L*overhead + FLOPs/rate",
             "#   layer_overhead_ms      that fit's intercept per layer and micro-step (per-op costs)",
             "#   optimizer_ns_per_param AdamW (foreach) step + zero_grad per local parameter",
             "#   intra_node_GBps        gloo all_to_all_single: off-rank bytes per rank / (time - latency)",
             "#   collective_latency_us  that fit's intercept, charged per collective call",
             "#   allreduce_GBps, allreduce_latency_us  the same fit for gloo all_reduce (ring wire bytes",
             "#                          2(W-1)/W x buffer): gradient and TP all-reduces use these",
             "#   inter_node_GBps        = intra (one machine: no network measured)",
             "# With more ranks than cores (W=4 on 2 cores) a single short GEMM call is rarely descheduled, so",
             "# the GEMM figure stays near the 1-thread one; the sharing shows in the model rate (= bf16_tflops",
             "# x compute_efficiency, what step_time divides FLOPs by), the overhead and the latencies.",
             f"# load (1-min loadavg) before/after: {meta['load']}; steal during: {meta['steal']}",
             f"# per world (field-wise median of {meta['rounds']} rounds, interleaved over the worlds):"]
    for w, r in sorted(per_world.items()):
        lines.append(f"#   W={w}: threads/rank {r['threads']}, GEMM {r['gemm_tflops'] * 1e3:.1f} GFLOP/s, model "
                     f"{r['model_gflops']:.1f} GFLOP/s (fit of {r['fit_points']}, round 1), overhead "
                     f"{r['layer_overhead_ms']:.3f} ms/layer, AdamW {r['optimizer_ns_per_param']:.2f} ns/param"
                     + (f", a2a {r['a2a_GBps']:.3f} GB/s + {r['a2a_latency_us']:.0f} us, all-reduce "
                        f"{r['allreduce_GBps']:.3f} GB/s + {r['allreduce_latency_us']:.0f} us" if r.get("a2a_GBps") else ""))
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)


# ----------------------------------------------------------------------------- per-rank measurement

def _median_time(fn, iters: int, barrier=None) -> float:
    ts = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _gemm_rate(cfg, tokens: int, iters: int, barrier) -> float:
    """FLOP/s of the forward and both backward matmuls at the config's shapes."""
    import torch
    flops = secs = 0.0
    for M, K, N, count in gemm_shapes(cfg, tokens):
        x, w, g = torch.randn(M, K), torch.randn(K, N), torch.randn(M, N)

        def three():
            x @ w
            g @ w.t()
            x.t() @ g
        three()
        t = _median_time(three, iters, barrier)
        flops += 3 * 2 * M * K * N * count
        secs += t * count
    return flops / secs


def _model_fit(cfg, micro_batches: list[int], iters: int, barrier) -> dict:
    """time(T) of forward + loss + backward of the world-1 model, fitted as a + FLOPs(T)/R."""
    import torch
    import torch.nn.functional as F
    from moetrain import plan as P
    from moetrain.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(cfg.train.seed)
    model.train()
    s, V = cfg.train.seq_len, cfg.model.vocab_size
    per_token = P.flops_per_token(cfg, s)
    xs, ys = [], []
    for b in micro_batches:
        tok = torch.randint(0, V, (b, s + 1))

        def fwd_bwd():
            logits, auxes = model(tok[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), tok[:, 1:].reshape(-1))
            loss.backward()
        fwd_bwd()
        t = _median_time(fwd_bwd, iters, barrier)
        xs.append(b * s * per_token)
        ys.append(t)
    a, inv_rate = fit_line(xs, ys)
    # optimizer: AdamW over the model's parameters, as train/optim.py (foreach on CPU)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=False)
    step()
    n = sum(p.numel() for p in params)
    t_opt = _median_time(step, iters, barrier)
    return {"model_gflops": 1.0 / inv_rate / 1e9 if inv_rate > 0 else float("inf"),
            "model_intercept_ms": a * 1e3, "layer_overhead_ms": max(0.0, a) * 1e3 / cfg.model.n_layers,
            "fit_points": [(b, round(y * 1e3, 2)) for b, y in zip(micro_batches, ys)],
            "optimizer_ns_per_param": t_opt / n * 1e9, "params": n}


def _collective_fit(kind: str, sizes: list[int], iters: int, world: int) -> tuple[float, float]:
    """(latency s, GB/s) of gloo all_to_all_single (uniform) / all_reduce over all ranks, on
    the off-rank (a2a) or ring-wire (all-reduce) bytes; each size's time is the max over ranks
    of each rank's median call."""
    import torch
    import torch.distributed as dist
    xs, ys = [], []
    for size in sizes:
        count = max(world, size // 4 // world * world)
        send = torch.ones(count)
        recv = torch.empty(count)
        if kind == "a2a":
            def call():
                dist.all_to_all_single(recv, send)
            wire = count * 4 * (world - 1) / world
        else:
            def call():
                dist.all_reduce(send)
            wire = count * 4 * 2 * (world - 1) / world
        for _ in range(3):
            call()
        dist.barrier()
        t = _median_time(call, iters)
        tt = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        xs.append(wire)
        ys.append(float(tt))
    return collective_figures(xs, ys)


def collective_figures(wire: list[float], secs: list[float]) -> tuple[float, float]:
    """(latency s, GB/s) from call times at increasing sizes: the latency is the smallest
    size's time, the bandwidth the least-squares slope over the other sizes (a tiny-size point
    would tilt it); a non-positive slope (noise) falls back to the largest size's bytes over its
    whole time."""
    lat = secs[0]
    _, inv_bw = fit_line(wire[1:], secs[1:])
    bw = 1.0 / inv_bw if inv_bw > 0 else wire[-1] / secs[-1]
    if lat >= secs[-1]:
        bw = wire[-1] / secs[-1]
    return lat, bw / 1e9


def rank_calibrate(args, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    from moetrain.config import load_config
    from moetrain.cpu_runtime import keep_freed_memory, threads_per_process
    threads = threads_per_process(0, world)
    torch.set_num_threads(threads)
    keep_freed_memory()
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        barrier = dist.barrier
    else:
        barrier = None
    cfg = load_config(args.config, ["train.device=cpu"] + list(args.set))
    from moetrain.config import micro_batch
    b = micro_batch(cfg, 1)
    res = {"world": world, "threads": threads}
    q = args.quick
    res["gemm_tflops"] = _gemm_rate(cfg, b * cfg.train.seq_len, 2 if q else args.iters, barrier) / 1e12
    mbs = [1, 2] if q else sorted({max(1, b // 4), max(1, b // 2), b})
    fit = _model_fit(cfg, mbs, 2 if q else args.iters, barrier)
    res.update(fit)
    res["compute_efficiency"] = fit["model_gflops"] / (res["gemm_tflops"] * 1e3)
    if world > 1:
        # sizes around the tiny config's per-call a2a payload (T*K*D*4 bytes, ~1-4 MiB)
        sizes = [4 * 1024, 64 * 1024, 1024 * 1024] if q else [4 * 1024] + [2 ** k * 1024 * 1024 for k in range(4)]
        it = 3 if q else max(10, args.iters * 2)
        lat, bw = _collective_fit("a2a", sizes, it, world)
        res.update(a2a_latency_us=lat * 1e6, a2a_GBps=bw)
        lat, bw = _collective_fit("all_reduce", sizes, it, world)
        res.update(allreduce_latency_us=lat * 1e6, allreduce_GBps=bw)
    # every rank's figures to rank 0: the slowest rank's rates, the largest costs
    if world > 1:
        objs = [None] * world
        dist.all_gather_object(objs, res)
    else:
        objs = [res]
    if rank == 0:
        merged = dict(res)
        for k in ("gemm_tflops", "model_gflops", "a2a_GBps", "allreduce_GBps", "compute_efficiency"):
            if k in merged:
                merged[k] = min(o[k] for o in objs)
        for k in ("layer_overhead_ms", "optimizer_ns_per_param", "a2a_latency_us", "allreduce_latency_us",
                  "model_intercept_ms"):
            if k in merged:
                merged[k] = max(o[k] for o in objs)
        merged["compute_efficiency"] = merged["model_gflops"] / (merged["gemm_tflops"] * 1e3)
        with open(args._result, "w") as f:
            json.dump(merged, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def calibrate_world(args, world: int) -> dict:
    from tools._local_ranks import run_local_ranks
    with tempfile.TemporaryDirectory() as tmp:
        args._result = os.path.join(tmp, "res.json")
        if world == 1:
            rank_calibrate(args, 0, 1)
        else:
            run_local_ranks(rank_calibrate, args, world)
        with open(args._result) as f:
            return json.load(f)


def _steal():
    try:
        from tools._cpu_steal import StealMeter
    except ImportError:
        from _cpu_steal import StealMeter
    return StealMeter().start()


def calibrate(args) -> int:
    import torch
    worlds = [args.world] if args.world else [int(w) for w in args.worlds.split(",") if w]
    load0 = os.getloadavg()[0]
    meter = _steal()
    rounds: dict = {w: [] for w in worlds}
    for k in range(1 if args.quick else args.rounds):      # interleaved: drifts hit every world alike
        for w in worlds:
            rounds[w].append(calibrate_world(args, w))
    per_world = {w: median_result(rs) for w, rs in rounds.items()}
    for w in worlds:
        r = per_world[w]
        print(f"calibrate: world {w}: {r['threads']} thread(s)/rank, GEMM {r['gemm_tflops'] * 1e3:.1f} GFLOP/s, "
              f"model {r['model_gflops']:.1f} GFLOP/s + {r['layer_overhead_ms']:.3f} ms/layer "
              f"(points {r['fit_points']}), AdamW {r['optimizer_ns_per_param']:.2f} ns/param"
              + (f", a2a {r['a2a_GBps']:.3f} GB/s + {r['a2a_latency_us']:.0f} us, all-reduce "
                 f"{r['allreduce_GBps']:.3f} GB/s + {r['allreduce_latency_us']:.0f} us" if w > 1 else ""),
              flush=True)
    steal = meter.fraction()
    load1 = os.getloadavg()[0]
    ref = pick_reference(worlds, args.reference_world)
    if ref not in per_world:
        raise SystemExit(f"calibrate_hardware: error: --reference-world {ref} was not calibrated ({worlds})")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    data = hardware_dict(per_world, ref, mem, args.name or f"CPU here ({os.cpu_count()} cores, gloo)")
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "config": os.path.relpath(args.config, _REPO) if args.config else None,
            "reference": ref, "rounds": 1 if args.quick else args.rounds, "load": f"{load0:.2f} / {load1:.2f}",
            "steal": f"{steal:.1%}" if steal is not None else "unknown"}
    text = render_yaml(data, per_world, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"calibrate: wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- validation runs

def layouts_for(config: str, world: int, modes: tuple) -> list:
    from moetrain import plan as P
    from moetrain.config import load_config
    cfg = load_config(config, ["train.device=cpu", "checkpoint.every=0", "parallel.dp=null"])
    return P.enumerate_layouts(cfg, world, modes=modes)


def train_once(config: str, world: int, layout, steps: int, warmup: int, workdir: str, extra=()) -> dict:
    """One torchrun of `layout`; returns its step-time summary (median etc. of max-over-ranks
    step_ms after `warmup` steps)."""
    name = f"w{world}-{layout}-{int(time.time() * 1000) % 10 ** 8}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "moetrain.train", "--config", config, *layout.overrides(), f"train.steps={steps}",
           "train.device=cpu", "checkpoint.every=0", "train.eval_every=0", "train.eval_batches=1",
           "logging.every=1", "logging.tensorboard=false", "train.progress=false",
           f"logging.dir={workdir}", f"logging.run_name={name}", *extra]
    load0 = os.getloadavg()[0]
    meter = _steal()
    t0 = time.time()
    try:       # a generous bound: a stuck rendezvous or collective must not stall the whole sweep
        proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=600 + 30 * steps)
    except subprocess.TimeoutExpired:
        return {"world": world, "layout": str(layout), "error": f"timed out after {600 + 30 * steps} s"}
    wall = time.time() - t0
    steal = meter.fraction()
    if proc.returncode != 0:
        return {"world": world, "layout": str(layout), "error": (proc.stderr or proc.stdout)[-2000:]}
    recs = [json.loads(line) for line in open(os.path.join(workdir, name, "metrics.jsonl")) if line.strip()]
    recs = [r for r in recs if r["step"] > warmup]
    step = [max(r["ranks.step_ms"]) for r in recs]
    a2a = [max(r["ranks.a2a_ms"]) for r in recs]
    imb = [r.get("rank_imbalance", 1.0) for r in recs]
    srt = sorted(step)
    return {"world": world, "layout": str(layout), "dp": layout.dp, "tp": layout.tp, "ep": layout.ep,
            "etp": layout.etp, "mode": layout.mode, "steps": len(step),
            "median_ms": statistics.median(step), "min_ms": min(step), "max_ms": max(step),
            "p10_ms": srt[len(srt) // 10], "step_ms": [round(x, 1) for x in step],
            "a2a_ms": [round(x, 1) for x in a2a],
            "a2a_median_ms": statistics.median(a2a), "rank_imbalance": statistics.median(imb),
            "drop_frac": statistics.median(r["drop_frac"] for r in recs),
            "wall_s": round(wall, 1), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            "steal": steal, "when": time.strftime("%H:%M:%S", time.gmtime())}


def wait_for_quiet(load: float, max_wait: float) -> float:
    """Wait (at most max_wait s) until the 1-minute load average is below `load`: the machine is
    shared, and a run that starts on a busy machine measures the other tenants. Returns the load."""
    t0 = time.time()
    while os.getloadavg()[0] >= load and time.time() - t0 < max_wait:
        time.sleep(5)
    return os.getloadavg()[0]


def validate_runs(args) -> int:
    modes = tuple(args.modes.split(","))
    worlds = [int(w) for w in args.worlds.split(",") if w]
    todo = [(w, lay) for w in worlds for lay in layouts_for(args.config, w, modes)]
    print(f"validate: {len(todo)} layouts x {args.repeats} repeats", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for rep in range(args.repeats):
            for w, lay in todo:
                wait_for_quiet(args.quiet_load, args.quiet_wait)
                r = train_once(args.config, w, lay, args.steps, args.warmup, work)
                r["repeat"] = rep
                print(json.dumps(r), flush=True)
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


# ----------------------------------------------------------------------------- report

def predictions(config: str, hardware: str, world: int) -> dict:
    """layout -> (row of plan_layout.plan_rows, StepTime) for CPU fp32 runs of `config`."""
    from plan_layout import load_hardware, plan_rows
    from moetrain import plan as P
    from moetrain.config import load_config
    hw = load_hardware(hardware)
    cfg = load_config(config, ["train.device=cpu", "checkpoint.every=0", "parallel.dp=null"])
    rows = plan_rows(cfg, world, world, hw, micro_cap=cfg.train.micro_batch_size, modes=P.MODES, device="cpu")
    out = {}
    for r in rows:
        lay = P.Layout(r["dp"], r["tp"], r["ep"], r["etp"], r["mode"])
        pl = P.plan(cfg, lay, device="cpu", micro_batch=r["micro_batch"])
        out[r["layout"]] = (r, P.step_time(cfg, pl, hw, world))
    return out


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0] * len(values)
    for pos, i in enumerate(order):
        out[i] = pos + 1
    return out


def report(args) -> int:
    runs = [json.loads(line) for p in args.report for line in open(p) if line.strip()]
    bad = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    by: dict = {}
    for r in runs:
        by.setdefault((r["world"], r["layout"]), []).append(r)
    worst = 0.0
    order_ok = True
    for world in sorted({w for w, _ in by}):
        pred = predictions(args.config, args.hardware, world)
        keys = [k for k in by if k[0] == world]
        rows = []
        for _, lay in keys:
            rs = by[(world, lay)]
            meds = [r["median_ms"] for r in rs]
            meas = statistics.median(meds)
            row, st = pred[lay]
            p = row["step_ms"]
            rows.append((lay, meas, min(r["min_ms"] for r in rs), max(r["max_ms"] for r in rs), meds, p, st,
                         statistics.median(r["a2a_median_ms"] for r in rs),
                         [r["load_before"] for r in rs]))
        rows.sort(key=lambda x: x[1])
        mr = _ranks([x[1] for x in rows])
        pr = _ranks([x[5] for x in rows])
        print(f"\n### world {world}\n")
        print("| layout | measured ms (median of run medians; min-max step; run medians) | predicted ms | error | "
              "error vs best run | pred compute / overhead / optim / a2a / grad / tp ms | meas a2a ms | "
              "rank meas / pred | load |")
        print("|:--|:--|--:|--:|--:|:--|--:|--:|:--|")
        for (lay, meas, lo, hi, meds, p, st, a2a, loads), a, b in zip(rows, mr, pr):
            err = 100.0 * (p - meas) / meas
            err_best = 100.0 * (p - min(meds)) / min(meds)
            worst = max(worst, abs(err))
            print(f"| {lay} | {meas:.0f} ({lo:.0f}-{hi:.0f}; {', '.join(f'{m:.0f}' for m in meds)}) | {p:.0f} | "
                  f"{err:+.1f}% | {err_best:+.1f}% | "
                  f"{st.compute * 1e3:.0f} / {st.overhead * 1e3:.0f} / {st.optimizer * 1e3:.0f} / "
                  f"{(st.a2a_intra + st.a2a_inter) * 1e3:.0f} / {st.grad_sync * 1e3:.0f} / {st.tp * 1e3:.0f} | "
                  f"{a2a:.0f} | {a} / {b} | {', '.join(f'{x:.1f}' for x in loads)} |")
        order_ok &= mr == pr
        # discordant pairs, and whether the measurement separates them (run medians do not overlap)
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a_, b_ = rows[i], rows[j]          # a_ measured faster than b_
                if a_[5] > b_[5]:
                    sep = ("one run each" if len(a_[4]) < 2 or len(b_[4]) < 2 else
                           "run medians separate" if max(a_[4]) < min(b_[4]) else "run medians overlap")
                    print(f"discordant: {a_[0]} ({a_[1]:.0f} ms measured, {a_[5]:.0f} predicted) vs {b_[0]} "
                          f"({b_[1]:.0f}, {b_[5]:.0f}); {sep}")
        print(f"\nmeasured order: {' < '.join(x[0] for x in rows)}")
        print(f"predicted order: {' < '.join(x[0] for x in sorted(rows, key=lambda x: x[5]))}")
    print(f"\nworst |error| {worst:.1f}% (target 25%); same order at every world: {order_ok}")
    for r in bad:
        print(f"FAILED run world {r['world']} {r['layout']}: {r['error'][-300:]}")
    return 0 if worst <= 25 and order_ok else 1


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default=None, help="hardware YAML to write (calibration)")
    ap.add_argument("--world", type=int, default=None, help="calibrate this one world only")
    ap.add_argument("--worlds", default="1,2,4", help="worlds to calibrate / validate")
    ap.add_argument("--reference-world", type=int, default=None, help="world of the top-level figures (default: largest)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="calibration rounds per world (field-wise median)")
    ap.add_argument("--iters", type=int, default=7, help="timed repetitions per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny repetitions (tests)")
    ap.add_argument("--validate", action="store_true", help="train every layout and record step times")
    ap.add_argument("--modes", default="native", help="layout modes to validate (native,fsdp)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--quiet-load", type=float, default=1e9,
                    help="--validate: before each run wait until the 1-min load average is below this")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="... for at most this many seconds")
    ap.add_argument("--json", default="calibrate_runs.jsonl", help="--validate appends runs here")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSONL", help="compare runs with the planner")
    ap.add_argument("--hardware", default=None, help="hardware file for --report")
    args = ap.parse_args(argv)
    if args.report:
        if not args.hardware:
            ap.error("--report needs --hardware")
        return report(args)
    if args.validate:
        if not 0 <= args.warmup < args.steps:
            ap.error(f"--warmup {args.warmup} must be >= 0 and below --steps {args.steps} (steps are measured after it)")
        return validate_runs(args)
    if not args.out:
        ap.error("--out is required (or --validate / --report)")
    if args.world is not None and args.world < 1:
        ap.error("--world must be >= 1")
    return calibrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
