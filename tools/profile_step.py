#!/usr/bin/env python
"""Profile moetrain training steps with torch.profiler: where does a step's time go, per rank?

    python tools/profile_step.py --world 4 parallel.ep=4                  # 4 gloo ranks on CPU
    python tools/profile_step.py --world 2 --config configs/switch.yaml --steps 5 parallel.ep=2
    torchrun --nproc_per_node 8 tools/profile_step.py --config configs/X.yaml parallel.ep=8
    (srun / mpiexec work too: rank and world come from the launcher, as for moetrain.train)

Arguments after the options are config overrides, exactly as for `python -m moetrain.train`.
The model, data and step are the trainer's own (moetrain.train.loop.build_trainer /
Trainer.train_step); nothing is written to a run directory and no checkpoint is touched.

Regions (record_function labels):
  moe/router, moe/dispatch, moe/experts, moe/combine   MoELayer.forward (moetrain/moe/layer.py)
  moe/a2a/<phase>                                      every all-to-all (moetrain/parallel/comm.py):
      counts, dispatch (launch), dispatch_wait, combine, dispatch_bwd, combine_bwd
  train/forward, train/grad_sync, train/clip           the trainer's forward, gradient all-reduce
                                                       and norm clipping (moetrain/train/loop.py)
  ProfilerStep#k                                       one optimizer step (torch.profiler)

Output under --out (default bench_out/profile):
  trace_rank<r>.json        Chrome trace (chrome://tracing or https://ui.perfetto.dev)
  tb/                       TensorBoard profiler traces (pip install torch-tb-profiler;
                            tensorboard --logdir OUT/tb)
  summary.json              the per-rank numbers below
  summary.png               stacked bars per rank: compute, a2a_fwd, a2a_bwd, grad_sync
and a printed per-rank summary, in ms per step (mean over the --steps profiled steps):
  step      wall time of a step (ProfilerStep)
  comm      all-to-all (moe/a2a/*, forward + backward) + gradient sync (train/grad_sync): host
            time spent in or blocked on collectives, which includes waiting for slower peers
  compute   step - comm
  a2a_fwd / a2a_bwd / grad_sync   the parts of comm
  router / dispatch / experts / combine   forward MoE regions; dispatch and combine exclude
            their all-to-alls (what is left: sorting, gathers, the shared experts when overlapped)
On CUDA the summary also gives device time: gpu_comm (NCCL kernels) and gpu_compute (the rest).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tools._local_ranks import exit_now, run_local_ranks  # noqa: E402
from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402

COLUMNS = ("step", "compute", "comm", "comm_pct", "a2a_fwd", "a2a_bwd", "grad_sync", "router", "dispatch",
           "experts", "combine")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="profile_step", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default="configs/tiny_cpu.yaml")
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn when not launched by torchrun/srun/mpiexec")
    ap.add_argument("--steps", type=int, default=3, help="profiled (active) steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before profiling starts")
    ap.add_argument("--out", default="bench_out/profile")
    ap.add_argument("--record-shapes", action="store_true")
    ap.add_argument("--with-stack", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: train.num_threads rule)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.ep=4 moe.num_experts=16")
    return ap


# ----------------------------------------------------------------------------- summary (pure)

def _intervals(events, pred) -> list[tuple[float, float, int]]:
    return [(e.time_range.start, e.time_range.end, e.thread) for e in events if pred(e.name)]


def _overlap(outer: tuple, inner: list) -> float:
    s, t, th = outer
    return sum(max(0.0, min(t, b) - max(s, a)) for a, b, th2 in inner if th2 == th)


def summarize_events(events, steps: int) -> dict:
    """Host-side ms per step by region from profiler FunctionEvents (name, time_range in us,
    thread). Device time comes from the Chrome trace instead (device_summary)."""
    def total(pred):
        return sum(e.time_range.elapsed_us() for e in events if pred(e.name)) / 1e3

    a2a = _intervals(events, lambda n: n.startswith("moe/a2a/"))
    n = max(1, steps)
    out = {
        "step": total(lambda n_: n_.startswith("ProfilerStep")) / n,
        "a2a_fwd": total(lambda n_: n_.startswith("moe/a2a/") and not n_.endswith("_bwd")) / n,
        "a2a_bwd": total(lambda n_: n_.startswith("moe/a2a/") and n_.endswith("_bwd")) / n,
        "grad_sync": total(lambda n_: n_ == "train/grad_sync") / n,
        "forward": total(lambda n_: n_ == "train/forward") / n,
        "router": total(lambda n_: n_ == "moe/router") / n,
        "experts": total(lambda n_: n_ == "moe/experts") / n,
    }
    for region in ("dispatch", "combine"):
        spans = _intervals(events, lambda n_, r=region: n_ == f"moe/{r}")
        out[region] = sum((t - s) - _overlap((s, t, th), a2a) for s, t, th in spans) / 1e3 / n
    out["comm"] = out["a2a_fwd"] + out["a2a_bwd"] + out["grad_sync"]
    out["compute"] = max(0.0, out["step"] - out["comm"])
    out["comm_pct"] = 100.0 * out["comm"] / out["step"] if out["step"] > 0 else 0.0
    return out


def device_summary(trace_events: list, steps: int) -> dict:
    """Device ms per step from a Chrome trace's events: NCCL kernels (gpu_comm) and every other
    kernel, memcpy and memset (gpu_compute). Empty when the trace holds no device activity."""
    dev = [e for e in trace_events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not dev:
        return {}
    n = max(1, steps)
    comm = sum(float(e.get("dur", 0)) for e in dev if "nccl" in e.get("name", "").lower())
    total = sum(float(e.get("dur", 0)) for e in dev)
    return {"gpu_comm": comm / 1e3 / n, "gpu_compute": (total - comm) / 1e3 / n}


def format_summary(per_rank: list[dict]) -> str:
    cols = list(COLUMNS) + [c for c in ("gpu_compute", "gpu_comm") if c in per_rank[0]]
    lines = ["rank " + " ".join(f"{c:>9}" for c in cols)]
    for r, s in enumerate(per_rank):
        lines.append(f"{r:>4} " + " ".join(f"{s[c]:>9.2f}" for c in cols))
    mean = {c: sum(s[c] for s in per_rank) / len(per_rank) for c in cols}
    lines.append("mean " + " ".join(f"{mean[c]:>9.2f}" for c in cols))
    return "\n".join(lines)


def plot_summary(per_rank: list[dict], png: str, title: str) -> None:
    """Stacked bars per rank: compute, all-to-all forward, all-to-all backward, gradient sync."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = (("compute", "tab:green"), ("a2a_fwd", "tab:orange"), ("a2a_bwd", "tab:red"), ("grad_sync", "tab:purple"))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(per_rank), 3.8))
    bottom = [0.0] * len(per_rank)
    x = list(range(len(per_rank)))
    for key, color in parts:
        vals = [s[key] for s in per_rank]
        ax.bar(x, vals, bottom=bottom, color=color, label=key, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(x)
    ax.set_xticklabels([f"rank {r}" for r in x])
    ax.set_ylabel("ms per step")
    ax.set_title(f"profile_step: {title}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- run

def rank_main(args, rank: int, world: int) -> None:
    from moetrain.config import load_config, validate_layout
    from moetrain.cpu_runtime import configure_cpu_process
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel, read_launch_env, shutdown
    from moetrain.precision import configure_determinism
    from moetrain.train.loop import build_trainer

    env = read_launch_env()
    cfg = load_config(args.config, args.overrides)
    dp, tp, ep = validate_layout(cfg, env.world_size)
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size, cfg.data.cache_dir)
    configure_cpu_process(args.threads or cfg.train.num_threads, env.local_world_size, env.launcher)   # as training does
    configure_determinism(cfg.train.deterministic)
    par = init_parallel(dp, tp, ep, env, cfg.train.device, backend=cfg.parallel.backend)
    try:
        trainer = build_trainer(cfg, par, data)
        os.makedirs(args.out, exist_ok=True)
        if rank == 0:
            print(f"# profile_step: world {par.world} (dp {par.dims.dp}, tp {par.dims.tp}, ep {par.dims.ep}) on "
                  f"{par.device}; {args.warmup} warmup + {args.steps} profiled steps; config {args.config} "
                  f"{' '.join(args.overrides)}", flush=True)
        per_rank = _gather(profile_steps(trainer, args, rank), world)
        if rank == 0:
            write_summary(per_rank, par, args)
    finally:
        shutdown()


def profile_steps(trainer, args, rank: int) -> dict:
    """--warmup then --steps optimizer steps of the trainer under torch.profiler: writes this
    rank's traces and returns its summary (summarize_events, plus device_summary on CUDA)."""
    device = trainer.par.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tb_dir = os.path.join(args.out, "tb")
    trace = os.path.join(args.out, f"trace_rank{rank}.json")
    result = {}

    def on_ready(prof):
        # a trace can be saved once: save the Chrome trace, then copy it under the name the
        # TensorBoard profiler plugin looks for (what tensorboard_trace_handler would write)
        prof.export_chrome_trace(trace)
        os.makedirs(tb_dir, exist_ok=True)
        shutil.copyfile(trace, os.path.join(tb_dir, f"rank{rank}.{time.time_ns()}.pt.trace.json"))
        result.update(summarize_events(prof.events(), args.steps))
        if cuda:
            with open(trace) as f:
                result.update(device_summary(json.load(f).get("traceEvents", []), args.steps))

    with profile(
            activities=activities, schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
            on_trace_ready=on_ready, record_shapes=args.record_shapes, with_stack=args.with_stack) as prof:
        for step in range(args.warmup + args.steps):
            trainer.train_step(step)
            if cuda:
                torch.cuda.synchronize(device)
            prof.step()
    return result


def write_summary(per_rank: list[dict], par, args) -> None:
    """Rank 0: print the per-rank table, write summary.json and summary.png."""
    print("# ms per step (host time; comm = all-to-all fwd+bwd + gradient sync, incl. waiting for peers)")
    print(format_summary(per_rank), flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"world": par.world, "dp": par.dims.dp, "tp": par.dims.tp, "ep": par.dims.ep,
                   "device": par.device.type, "steps": args.steps, "config": args.config,
                   "overrides": args.overrides, "ms_per_step": per_rank}, f, indent=1)
    png = os.path.join(args.out, "summary.png")
    plot_summary(per_rank, png, f"world {par.world} (dp {par.dims.dp}, ep {par.dims.ep}) on {par.device.type}")
    print(f"# traces: {args.out}/trace_rank*.json  tensorboard: {os.path.join(args.out, 'tb')}  summary: "
          f"{args.out}/summary.json {png}", flush=True)


def _gather(result: dict, world: int) -> list[dict]:
    if world == 1:
        return [result]
    out = [None] * world
    dist.all_gather_object(out, result)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.world < 1:
        raise SystemExit("profile_step: error: --steps must be >= 1, --warmup >= 0, --world >= 1")
    from moetrain.config import ConfigError, load_config, validate_layout
    from moetrain.parallel.mesh import read_launch_env
    env = read_launch_env()
    world = env.world_size if env.world_size > 1 else args.world
    try:   # bad configs fail here, once, before any process is spawned
        validate_layout(load_config(args.config, args.overrides), world)
    except ConfigError as exc:
        raise SystemExit(f"profile_step: error: {exc}")
    if env.world_size > 1 or world == 1:
        rank_main(args, env.rank, world)
        exit_now(0)
    run_local_ranks(rank_main, args, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
