#!/usr/bin/env python
"""Which (dp, tp, ep, etp, FSDP/ZeRO, micro batch) layouts of a config fit a cluster, and what
each one's step would cost: memory per GPU and a modelled step time (moetrain/plan.py).

    python tools/plan_layout.py --config configs/tiny_cpu.yaml --gpus 64 --gpus-per-node 8 --hardware h100
    python tools/plan_layout.py --config X.yaml --gpus 1024 --gpus-per-node 8 --hardware my_gpu.yaml \\
        --global-batch 1024 --seq-len 4096 [--skew 1.3] [--set model.dim=4096 ...] [--json out.json]

--hardware: a preset of configs/hardware/ (h100, h200, a100: figures and their sources in each
file) or a YAML file with the same keys (name, bf16_tflops, memory_gib, memory_reserve_gib,
intra_node_GBps, inter_node_GBps per GPU and direction, compute_efficiency, comm_efficiency; optional
fixed costs layer_overhead_ms, optimizer_ns_per_param, collective_latency_us and by_local_ranks, as
tools/calibrate_hardware.py writes for a CPU host: see moetrain/plan.Hardware).

For every layout config validation accepts at --gpus ranks (plan.enumerate_layouts), the largest
micro batch up to train.micro_batch_size (or --micro-batch) that divides the per-rank batch and
fits in memory is taken. Memory per GPU = parameters + gradients + optimizer state (sharded as
moetrain shards them) + one micro-step's activations (no activation checkpointing) + FSDP's
gathered units + bf16 weight copies, under bf16 autocast (the GPU default). Step time = compute
(FLOPs at the preset's efficiency) + all-to-all (on-node peers at NVLink, others at the network
rate) + gradient/parameter collectives + TP all-reduces, with no overlap assumed: an upper bound
on a well-overlapped run and a ranking, not a promise. The layouts that fit are listed fastest
first; the best three are recommended. Not calibrated against measured GPU step times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

HARDWARE_DIR = os.path.join(_REPO, "configs", "hardware")
GIB = 2 ** 30


def load_hardware(name_or_path: str):
    import yaml
    from moetrain.plan import Hardware
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(HARDWARE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(HARDWARE_DIR) if f.endswith(".yaml"))
        raise SystemExit(f"plan_layout: error: --hardware {name_or_path!r}: no such file and not a preset "
                         f"({', '.join(presets)})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"plan_layout: error: {path}: cannot read ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"plan_layout: error: {path}: expected a mapping of hardware figures")
    fields = set(Hardware.__dataclass_fields__)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SystemExit(f"plan_layout: error: {path}: unknown keys {unknown} (allowed: {sorted(fields)})")
    try:
        return Hardware(**data)
    except TypeError as exc:
        raise SystemExit(f"plan_layout: error: {path}: {exc}") from None


def _micro_candidates(local_batch: int, cap: int) -> list[int]:
    return [b for b in range(min(cap, local_batch), 0, -1) if local_batch % b == 0]


def plan_rows(cfg, gpus: int, gpus_per_node: int, hw, skew: float = 1.0, micro_cap=None,
              modes=None, device: str = "cuda") -> list[dict]:
    """One row per layout (fitting or not) with its best micro batch, memory and step time."""
    from moetrain import plan as P
    t = cfg.train
    cap = micro_cap or t.micro_batch_size
    rows = []
    for lay in P.enumerate_layouts(cfg, gpus, modes=modes or P.MODES):
        local = t.global_batch_size // lay.dp
        chosen = None
        for b in _micro_candidates(local, cap):
            pl = P.plan(cfg, lay, device=device, skew=skew, micro_batch=b)
            chosen = pl
            if pl.memory_bytes <= hw.usable_bytes:
                break
        pl = chosen
        st = P.step_time(cfg, pl, hw, gpus_per_node, skew)
        rows.append({
            "layout": str(lay), "dp": lay.dp, "tp": lay.tp, "ep": lay.ep, "etp": lay.etp, "mode": lay.mode,
            "micro_batch": pl.micro_batch, "micro_steps": pl.micro_steps,
            "fits": pl.memory_bytes <= hw.usable_bytes,
            "mem_gib": pl.memory_bytes / GIB, "state_gib": pl.state.total / GIB,
            "act_gib": pl.activations / GIB, "other_gib": (pl.state.transient + pl.weight_copies) / GIB,
            "compute_ms": st.compute * 1e3, "a2a_intra_ms": st.a2a_intra * 1e3, "a2a_inter_ms": st.a2a_inter * 1e3,
            "grad_ms": st.grad_sync * 1e3, "tp_ms": st.tp * 1e3, "fixed_ms": (st.overhead + st.optimizer) * 1e3,
            "step_ms": st.total * 1e3,
            "tokens_per_s": t.global_batch_size * t.seq_len / st.total,
        })
    rows.sort(key=lambda r: (not r["fits"], r["step_ms"]))
    return rows


def _n(x: float) -> str:
    """3 significant digits, no exponent for everyday sizes."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def table(rows: list[dict], limit: int) -> str:
    """Markdown rows; a "fixed ms" column (per-layer overheads + optimizer, from a calibrated
    hardware file) only when some row has one, so the columns always add up to the step."""
    fixed = any(r["fixed_ms"] > 0 for r in rows[:limit])
    lines = ["| layout | micro x steps | mem/GPU GiB (state + act + other) | compute ms | a2a intra ms | "
             "a2a inter ms | grad ms | tp ms | " + ("fixed ms | " if fixed else "") + "step ms | tokens/s |",
             "|:--|--:|:--|--:|--:|--:|--:|--:|" + ("--:|" if fixed else "") + "--:|--:|"]
    for r in rows[:limit]:
        lines.append(f"| {r['layout']} | {r['micro_batch']}x{r['micro_steps']} | {_n(r['mem_gib'])} "
                     f"({_n(r['state_gib'])} + {_n(r['act_gib'])} + {_n(r['other_gib'])}) | {_n(r['compute_ms'])} | "
                     f"{_n(r['a2a_intra_ms'])} | {_n(r['a2a_inter_ms'])} | {_n(r['grad_ms'])} | {_n(r['tp_ms'])} | "
                     + (f"{_n(r['fixed_ms'])} | " if fixed else "") + f"{_n(r['step_ms'])} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--hardware", default="h100", help="h100 | h200 | a100 | FILE.yaml")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (train.global_batch_size)")
    ap.add_argument("--seq-len", type=int, default=None, help="train.seq_len (model.max_seq_len grows to fit)")
    ap.add_argument("--micro-batch", type=int, default=None, help="largest micro batch to try")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype of the modelled run: bf16 (autocast, a GPU's train.precision=auto) "
                         "or fp32 (CPU training; with a --hardware file from tools/calibrate_hardware.py)")
    ap.add_argument("--skew", type=float, default=1.0, help="busiest rank's expert load / mean (dropless)")
    ap.add_argument("--modes", default=None, help="subset of native,fsdp,zero1,zero2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--top", type=int, default=20, help="rows to print")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args(argv)
    if args.gpus < 1 or args.gpus_per_node < 1 or args.skew < 1.0 or (args.micro_batch or 1) < 1:
        ap.error("--gpus, --gpus-per-node and --micro-batch must be >= 1, --skew >= 1")
    from moetrain.config import ConfigError, load_config
    over = list(args.set) + ["checkpoint.every=0", "checkpoint.resume=none", "parallel.dp=null",
                             "parallel.tp=1", "parallel.ep=1", "parallel.fsdp=false", "train.engine=native"]
    if args.global_batch:
        over.append(f"train.global_batch_size={args.global_batch}")
    if args.seq_len:
        over.append(f"train.seq_len={args.seq_len}")
    try:
        cfg = load_config(args.config, over)
        if args.seq_len and args.seq_len > cfg.model.max_seq_len:
            cfg = load_config(args.config, over + [f"model.max_seq_len={args.seq_len}"])
    except ConfigError as exc:
        raise SystemExit(f"plan_layout: error: {exc}") from None
    hw = load_hardware(args.hardware)
    modes = tuple(m for m in args.modes.split(",") if m) if args.modes else None
    rows = plan_rows(cfg, args.gpus, args.gpus_per_node, hw, args.skew, args.micro_batch, modes,
                     "cpu" if args.precision == "fp32" else "cuda")
    from moetrain.plan import count_params
    total, active = count_params(cfg)
    fit = [r for r in rows if r["fits"]]
    print(f"{args.config}: {_count(total)} parameters ({_count(active)} active); {args.gpus} x {hw.name} "
          f"({args.gpus_per_node} per node, {hw.memory_gib - hw.memory_reserve_gib:.1f} GiB usable); global batch "
          f"{cfg.train.global_batch_size} x {cfg.train.seq_len} tokens; skew {args.skew}")
    print(f"{len(rows)} valid layouts, {len(fit)} fit in memory\n")
    print(table(fit if fit else rows, args.top))
    if fit:
        print("\nrecommended: " + "; ".join(f"{i + 1}. {r['layout']} (micro {r['micro_batch']}, "
                                             f"{_n(r['mem_gib'])} GiB, {_n(r['step_ms'])} ms)"
                                             for i, r in enumerate(fit[:3])))
    else:
        print("\nno layout fits: all are above, fastest first (use more GPUs, a smaller micro batch or model)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if fit else 1


if __name__ == "__main__":
    raise SystemExit(main())
