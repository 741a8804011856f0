#!/usr/bin/env python
"""The memory model (moetrain/plan.py) against tools/bench_memory.py's measurement: parameter,
gradient and optimizer-state bytes per rank, for every layout bench_memory runs at the chosen
worlds (native, FSDP2, ZeRO-1/2), with the error of the model in % per layout.

    python tools/check_plan.py                            # worlds 1,2,4, all modes (measures: minutes)
    python tools/check_plan.py --worlds 1,2 --modes native,fsdp
    python tools/check_plan.py --from-json mem.jsonl      # rows bench_memory.py --json wrote earlier
    python tools/check_plan.py --quick                    # bench_memory's tiny model
    python tools/check_plan.py --a2a                      # all-to-all bytes vs ranks.a2a_mb instead

--a2a trains a small dropless config (A2A_CONFIG, 3 steps, CPU gloo ranks spawned here) at
ep=2 (world 2), ep=4 (world 4), dp=4 ep=2 and tp=2 ep=2 (world 4), and compares every logged
step's `ranks.a2a_mb` with the model: 2*(N_s + N_r)*D*4 bytes per rank, N_s = its tokens x top-k
per MoE layer (dropless), N_r from the logged routing counts (per-expert `moe.layer{i}.kept`
when dp = ep, else per-rank `moe.layer{i}.recv_tokens` x tp). Exits 1 on any difference.

Prints a markdown table (measured and modelled MiB per kind, max over ranks, and the total's
error) and exits 1 when any layout's total is off by more than --tolerance percent (default 10).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_REPO, os.path.join(_REPO, "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MIB = 2 ** 20


def model_rows(rows: list[dict], quick: bool) -> list[dict]:
    """Each measured row with the model's numbers next to it."""
    import bench_memory as bm
    from moetrain import plan as P
    from moetrain.config import load_config
    out = []
    for r in rows:
        cfg = load_config(None, bm.overrides("native", r["dp"], r["tp"], r["ep"], quick, "unused")
                          + ["train.device=cpu"])
        s = P.state_bytes(cfg, P.Layout(r["dp"], r["tp"], r["ep"], False, r["mode"]))
        meas = {k: max(rank[k] for rank in r["ranks"]) for k in ("params", "grads", "optim")}
        meas_total = max(sum(rank.values()) for rank in r["ranks"])
        out.append({**{k: r[k] for k in ("mode", "dp", "tp", "ep")},
                    "measured_mib": {**{k: round(v / MIB, 3) for k, v in meas.items()},
                                     "total": round(meas_total / MIB, 3)},
                    "model_mib": {k: round(getattr(s, k) / MIB, 3) for k in ("params", "grads", "optim", "total")},
                    "error_pct": round(100.0 * (s.total - meas_total) / meas_total, 2),
                    "model_params": P.count_params(cfg)[0], "measured_params": r.get("model")})
    return out


A2A_CONFIG = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.ffn_hidden=128",
              "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null", "train.seq_len=64",
              "train.global_batch_size=16", "train.micro_batch_size=2", "train.steps=3", "train.warmup_steps=1",
              "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "logging.every=1",
              "logging.tensorboard=false", "train.device=cpu"]
A2A_LAYOUTS = [(2, ["parallel.ep=2"]), (4, ["parallel.ep=4"]), (4, ["parallel.ep=2"]),
               (4, ["parallel.ep=2", "parallel.tp=2"])]


def _a2a_rank(args, rank, world):
    log_dir, extra = args
    from moetrain.config import load_config, validate_layout
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import LaunchEnv, init_parallel, shutdown
    from moetrain.train.loop import run_training
    cfg = load_config(None, A2A_CONFIG + [f"logging.dir={log_dir}"] + list(extra))
    dp, tp, ep = validate_layout(cfg, world)
    par = init_parallel(dp, tp, ep, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    run_training(cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size), log=lambda m: None)
    shutdown()


def check_a2a() -> list[dict]:
    """[{layout, step, rank, model bytes, model MiB, measured MiB}] for A2A_LAYOUTS."""
    from _local_ranks import run_local_ranks
    from moetrain import plan as P
    from moetrain.config import load_config
    out = []
    for world, extra in A2A_LAYOUTS:
        log_dir = tempfile.mkdtemp(prefix="check_plan_a2a_")
        run_local_ranks(_a2a_rank, (log_dir, extra), world)
        cfg = load_config(None, A2A_CONFIG + list(extra))
        lay = P.layout_of(cfg, world)
        with open(os.path.join(log_dir, cfg.logging.run_name, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        layers = P.routed_moe_layers(cfg)
        send = cfg.train.global_batch_size // lay.dp * cfg.train.seq_len * cfg.moe.routed_top_k * layers
        for rec in recs:
            if lay.dp == lay.ep:
                per_ep = [sum(c) for c in zip(*(P.recv_rows_from_loads(rec[f"moe.layer{i}.kept"], lay.ep)
                                                 for i in range(layers)))]
                recv = [per_ep[(r // lay.tp) % lay.ep] for r in range(world)]
            else:
                recv = [sum(rec[f"moe.layer{i}.recv_tokens"][r] for i in range(layers)) * lay.tp for r in range(world)]
            for r in range(world):
                b = P.a2a_bytes_rows(send, recv[r], cfg.model.dim, 4).total
                out.append({"layout": str(lay), "step": rec["step"], "rank": r, "send_rows": send,
                            "recv_rows": recv[r], "model_bytes": b, "model_mib": round(b / MIB, 4),
                            "measured_mib": rec["ranks.a2a_mb"][r]})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| dp | tp | ep | mode | measured params/grads/optim MiB | model params/grads/optim MiB | "
             "measured total | model total | error |",
             "|---:|---:|---:|:--|:--|:--|---:|---:|---:|"]
    for r in rows:
        m, p = r["measured_mib"], r["model_mib"]
        lines.append(f"| {r['dp']} | {r['tp']} | {r['ep']} | {r['mode']} | "
                     f"{m['params']:.2f} / {m['grads']:.2f} / {m['optim']:.2f} | "
                     f"{p['params']:.2f} / {p['grads']:.2f} / {p['optim']:.2f} | "
                     f"{m['total']:.2f} | {p['total']:.2f} | {r['error_pct']:+.2f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--modes", default="native,fsdp,zero1,zero2")
    ap.add_argument("--quick", action="store_true", help="bench_memory's tiny model")
    ap.add_argument("--from-json", default=None, help="measured rows (bench_memory --json) instead of measuring")
    ap.add_argument("--json", default=None, help="write the compared rows here")
    ap.add_argument("--tolerance", type=float, default=10.0, help="percent")
    ap.add_argument("--a2a", action="store_true", help="check all-to-all bytes against ranks.a2a_mb instead")
    args = ap.parse_args(argv)
    if args.a2a:
        rows = check_a2a()
        print("| layout | step | rank | rows sent | rows received | model bytes | model MiB | ranks.a2a_mb |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['layout']} | {r['step']} | {r['rank']} | {r['send_rows']} | {r['recv_rows']:.0f} | "
                  f"{r['model_bytes']:.0f} | {r['model_mib']:.4f} | {r['measured_mib']:.4f} |")
        bad = [r for r in rows if r["model_mib"] != r["measured_mib"]]
        print(f"\n{len(rows)} rank-steps, {len(bad)} differ")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 1 if bad else 0
    import bench_memory as bm
    if args.from_json:
        with open(args.from_json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        worlds = sorted({int(w) for w in args.worlds.split(",") if w})
        modes = [m for m in args.modes.split(",") if m]
        log_dir = tempfile.mkdtemp(prefix="check_plan_")
        rows = []
        for world in worlds:
            configs = [(m, dp, tp, ep) for dp, tp, ep in bm.layouts({world}) for m in modes
                       if bm.mode_applies(m, dp, tp)]
            if configs:
                started = time.perf_counter()
                rows += bm.run_world(world, configs, args.quick, log_dir)
                print(f"check_plan: world {world}: {len(configs)} layouts measured in "
                      f"{time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    compared = model_rows(rows, args.quick)
    print(table(compared))
    worst = max((abs(r["error_pct"]) for r in compared), default=0.0)
    print(f"\n{len(compared)} layouts, worst error {worst:.2f}% (tolerance {args.tolerance}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(compared, f, indent=1)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
