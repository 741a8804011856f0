#!/usr/bin/env python
"""Forward+backward timing of moetrain's MoELayer against a dense FFN of equal active FLOPs and
against DeepSpeed's MoE layer, on CPU (fp32), at world size 1 or N gloo ranks.

    python tools/bench_moe.py                                   # world 1, E = 8,32,128
    python tools/bench_moe.py --world 2 --experts 8,64,128      # spawns 2 gloo ranks, ep = 2
    torchrun --nproc_per_node 2 tools/bench_moe.py              # same, launched by torchrun
    python tools/bench_moe.py --tokens 64 --dim 16 --hidden 32 --experts 4 --warmup 0 --iters 1

Systems (every rank runs its own `--tokens` tokens; experts are sharded ep = world):
  moetrain   moetrain.moe.layer.MoELayer (grouped_mm = --impl; `all` runs loop and bmm), sharded
             with apply_ep over a Parallel from init_parallel. a2a_ms = sum of the CommTimer phases
             (counts, dispatch, combine and their backward) read after backward.
  dense      moetrain.moe.experts.SwiGLU(dim, hidden) on the input repeated k times: the FLOPs an
             MoE layer with no capacity padding and no drops spends on its experts.
  deepspeed  deepspeed.moe.layer.MoE with an `expert=` SwiGLU of the same sizes, same E, k,
             capacity factor (none -> drop_tokens=False), min_capacity, ep_size = world,
             use_rts=False and top2_2nd_expert_sampling=False (so it routes like ours). Router and
             expert weights are copied from ours, so both see the same routing decisions.

Each step: forward, loss = <y, g> + 0.01 * aux_loss (g fixed), backward into the parameters and
the input; gradients are set to None before each step (outside the timed region). Ranks meet at
a barrier before each step. Reported `ms` is the max over ranks of each rank's median over
`--iters` steps after `--warmup` steps. No data-parallel gradient reduction is timed: this is the
layer alone.

Output: a table on stdout, and one JSON object per measurement on its own line (also appended to
`--json FILE`), with keys system, experts, tokens (per rank), world, ms, fwd_ms, min_ms, cpu_ms,
impl, k, dim, hidden, capacity_factor, min_capacity, a2a_ms (moetrain at world > 1, else null),
a2a_share (= a2a_ms / ms), ratio_to_dense (ms / dense ms at the same E and world), drop_frac,
threads, ms_per_rank, loadavg_1m, steal_frac (hypervisor steal time over that E's timed steps,
from /proc/stat; null where unknown).

Noise: systems are timed round-robin (one step of each per round), so load from other processes
hits all of them alike. cpu_ms is the process CPU time of a step (median, slowest rank): with
`--threads 1` it barely moves when other processes compete for the cores, so prefer it for
A/B comparisons on a shared machine (with more threads it also counts OpenMP spin-waiting).
On an oversubscribed machine OpenMP's active spin-waiting (the default) makes each parallel op
wait for a descheduled sibling thread, which penalizes many small ops (the per-expert loop,
DeepSpeed's expert modules) far more than a few big ones (dense); OMP_WAIT_POLICY=PASSIVE
removes most of that distortion. A warning line is printed when the load average says so.
On a virtual machine the host can also take our vCPUs away (steal time, invisible in the load
average): the table is followed by the steal share during each E's timing, and a warning when it
exceeds 5%. Steal does not explain all noise: on the 2-core CI machine, with ~0% steal and a quiet
load average, the dense time alone moved between 107 and 159 ms across runs within an hour.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# DeepSpeed picks its accelerator at import time; it must see this before any deepspeed import.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moetrain.cpu_runtime import configure_cpu_process  # noqa: E402
from moetrain.moe.experts import SwiGLU  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.parallel.apply import apply_ep  # noqa: E402
from moetrain.parallel.mesh import init_parallel, read_launch_env  # noqa: E402
from tools._cpu_steal import StealMeter  # noqa: E402

SYSTEMS = ("dense", "moetrain", "deepspeed")
AUX_COEF = 0.01
INIT_STD = 0.02


# ----------------------------------------------------------------------------- arguments

def parse_capacity(v: str) -> Optional[float]:
    if v.lower() in ("none", "null", "dropless"):
        return None
    f = float(v)
    if f <= 0:
        raise argparse.ArgumentTypeError(f"--capacity-factor must be > 0 or 'none', got {v}")
    return f


def parse_int_list(v: str) -> list[int]:
    try:
        out = [int(s) for s in v.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {v!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="expert hidden size (default 512)")
    p.add_argument("--experts", type=parse_int_list, default=[8, 32, 128], help="e.g. 8,32,128")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--capacity-factor", type=parse_capacity, default=1.25,
                   help="float, or 'none' for dropless (default 1.25)")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--impl", choices=["auto", "loop", "bmm", "all"], default="all",
                   help="GroupedExperts grouped_mm for moetrain; 'all' = loop and bmm (default)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--world", type=int, default=1, help="gloo ranks to spawn (ep = world)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: the cores this process may use // world, as training)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    return p


def validate(args) -> None:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise SystemExit(f"--systems={args.systems}: unknown {bad}; allowed {','.join(SYSTEMS)}")
    args.system_list = systems
    for name in ("tokens", "dim", "hidden", "k", "world", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} must be >= 0")
    for e in args.experts:
        if e % args.world:
            raise SystemExit(f"--experts={e} is not divisible by the EP size (--world={args.world})")
        if args.k > e:
            raise SystemExit(f"--k={args.k} is larger than --experts={e}")


# ----------------------------------------------------------------------------- timing

class Ctx:
    """What a rank needs to run and report: its rank/world, the world group (None at world 1)."""

    def __init__(self, args, rank: int, world: int, group, par):
        self.args, self.rank, self.world, self.group, self.par = args, rank, world, group, par

    def barrier(self):
        if self.group is not None:
            dist.barrier(group=self.group)

    def gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


@dataclass
class Case:
    """One system ready to run: `step()` does forward+backward and returns (t_after_forward, extra)."""
    system: str
    impl: Optional[str]
    params: list
    x: torch.Tensor
    step: Callable[[], tuple[float, dict]]
    samples: list = field(default_factory=list)     # (total_ms, fwd_ms, cpu_ms, extra) per timed step


def run_case_once(ctx: Ctx, case: Case, timed: bool) -> None:
    for p in case.params:
        p.grad = None
    case.x.grad = None
    ctx.barrier()
    c0 = time.process_time()
    t0 = time.perf_counter()
    t_fwd, extra = case.step()
    t1 = time.perf_counter()
    c1 = time.process_time()
    if timed:
        case.samples.append(((t1 - t0) * 1e3, (t_fwd - t0) * 1e3, (c1 - c0) * 1e3, extra))


def time_cases(ctx: Ctx, cases: list[Case]) -> None:
    """Warm every case up, then time them round-robin (one step of each per round), so a burst
    of load from elsewhere on a shared machine hits all systems alike instead of one of them."""
    for _ in range(ctx.args.warmup):
        for case in cases:
            run_case_once(ctx, case, timed=False)
    for _ in range(ctx.args.iters):
        for case in cases:
            run_case_once(ctx, case, timed=True)


def summarize(case: Case) -> dict:
    """This rank's medians over the timed steps."""
    totals = [s[0] for s in case.samples]
    out = {"ms": statistics.median(totals), "min_ms": min(totals),
           "fwd_ms": statistics.median(s[1] for s in case.samples),
           "cpu_ms": statistics.median(s[2] for s in case.samples)}
    for key in (case.samples[0][3] if case.samples else {}):
        vals = [s[3][key] for s in case.samples if s[3].get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    return out


# ----------------------------------------------------------------------------- systems

def make_input(ctx: Ctx, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.args.seed * 7919 + ctx.rank)
    x = torch.randn(1, ctx.args.tokens, dim, generator=g).requires_grad_(True)
    grad_out = torch.randn(1, ctx.args.tokens, dim, generator=g)
    return x, grad_out


def build_ours(args, num_experts: int, impl: str) -> MoELayer:
    """Full layer, identical on every rank (seeded), initialized before sharding."""
    torch.manual_seed(args.seed)
    layer = MoELayer(args.dim, num_experts, args.k, args.hidden, args.capacity_factor,
                     min_capacity=args.min_capacity, grouped_mm=impl)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, INIT_STD)
        for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
            w.normal_(0.0, INIT_STD)
    return layer


def make_dense(ctx: Ctx, num_experts: int) -> Case:
    args = ctx.args
    torch.manual_seed(args.seed)
    ffn = SwiGLU(args.dim, args.hidden)
    x, g = make_input(ctx, args.dim)
    g_rep = g.reshape(-1, args.dim).repeat(args.k, 1)

    def step():
        y = ffn(x.reshape(-1, args.dim).repeat(args.k, 1))
        t_fwd = time.perf_counter()
        (y * g_rep).sum().backward()
        return t_fwd, {}

    return Case("dense", None, list(ffn.parameters()), x, step)


def make_ours(ctx: Ctx, num_experts: int, impl: str) -> Case:
    args = ctx.args
    layer = build_ours(args, num_experts, impl)
    layer.train()
    if ctx.par is not None:
        apply_ep(layer, ctx.par)
    x, g = make_input(ctx, args.dim)

    def step():
        y, aux = layer(x)
        t_fwd = time.perf_counter()
        ((y * g).sum() + AUX_COEF * aux.aux_loss).backward()
        a2a = sum(ms for ms, _ in aux.timer.totals().values()) if ctx.world > 1 else None
        dropped = 1.0 - float(aux.kept_E.sum()) / max(1, aux.num_copies)
        return t_fwd, {"a2a_ms": a2a, "drop_frac": dropped}

    return Case("moetrain", impl, list(layer.parameters()), x, step)


def deepspeed_available() -> tuple[bool, str]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import deepspeed  # noqa: F401
            import deepspeed.moe.layer  # noqa: F401
        return True, ""
    except Exception as exc:  # ImportError, or an accelerator/setup error at import time
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _adopt_process_group_in_deepspeed() -> None:
    """deepspeed.comm keeps its own backend object; with torch.distributed already initialized
    init_distributed only wraps the existing default group (no new rendezvous)."""
    import deepspeed
    _quiet_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def make_deepspeed(ctx: Ctx, num_experts: int) -> Case:
    from deepspeed.moe.layer import MoE
    _quiet_deepspeed()
    args = ctx.args
    ours = build_ours(args, num_experts, "loop")          # only for its weights
    local = num_experts // ctx.world
    first = ctx.rank * local                               # DS all-to-all layout: rank r owns [r*L, (r+1)*L)
    cf = args.capacity_factor
    with contextlib.redirect_stdout(io.StringIO()):
        moe = MoE(args.dim, SwiGLU(args.dim, args.hidden), num_experts=num_experts, ep_size=ctx.world,
                  k=args.k, capacity_factor=cf if cf is not None else 1.0,
                  eval_capacity_factor=cf if cf is not None else 1.0, min_capacity=args.min_capacity,
                  drop_tokens=cf is not None, use_rts=False, top2_2nd_expert_sampling=False)
        moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for l, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = first + l
            expert.w1.weight.copy_(ours.experts.w1[e].t())
            expert.w3.weight.copy_(ours.experts.w3[e].t())
            expert.w2.weight.copy_(ours.experts.w2[e].t())
    del ours
    moe.train()
    x, g = make_input(ctx, args.dim)

    def step():
        y, l_aux, _ = moe(x)
        t_fwd = time.perf_counter()
        ((y * g).sum() + AUX_COEF * l_aux).backward()
        return t_fwd, {}

    return Case("deepspeed", "padded", list(moe.parameters()), x, step)


# ----------------------------------------------------------------------------- driver

def impls_of(args) -> list[str]:
    return ["loop", "bmm"] if args.impl == "all" else [args.impl]


def record(ctx: Ctx, num_experts: int, case: Case) -> Optional[dict]:
    """Gather per-rank medians; on rank 0 return the JSON record (the slowest rank's numbers)."""
    per_rank = ctx.gather(summarize(case))
    if ctx.rank != 0:
        return None
    a = ctx.args
    slowest = max(per_rank, key=lambda r: r["ms"])
    a2a_vals = [r.get("a2a_ms") for r in per_rank if r.get("a2a_ms") is not None]
    rec = {
        "system": case.system, "experts": num_experts, "tokens": a.tokens, "world": ctx.world,
        "ms": round(slowest["ms"], 3), "fwd_ms": round(slowest["fwd_ms"], 3),
        "min_ms": round(max(r["min_ms"] for r in per_rank), 3),
        "cpu_ms": round(max(r["cpu_ms"] for r in per_rank), 3),
        "impl": case.impl, "k": a.k, "dim": a.dim, "hidden": a.hidden,
        "capacity_factor": a.capacity_factor, "min_capacity": a.min_capacity,
        "a2a_ms": round(max(a2a_vals), 3) if a2a_vals else None,
        "ms_per_rank": [round(r["ms"], 3) for r in per_rank],
        "threads": torch.get_num_threads(), "warmup": a.warmup, "iters": a.iters,
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    rec["a2a_share"] = round(rec["a2a_ms"] / rec["ms"], 4) if rec["a2a_ms"] is not None else None
    drops = [r.get("drop_frac") for r in per_rank if r.get("drop_frac") is not None]
    rec["drop_frac"] = round(sum(drops) / len(drops), 5) if drops else None
    return rec


def emit(ctx: Ctx, rec: Optional[dict], results: list) -> None:
    if rec is None:
        return
    results.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    if ctx.args.json:
        with open(ctx.args.json, "a") as f:
            f.write(line + "\n")


def build_cases(ctx: Ctx, num_experts: int, run_ds: bool) -> list[Case]:
    args = ctx.args
    cases = []
    if "dense" in args.system_list:
        cases.append(make_dense(ctx, num_experts))
    if "moetrain" in args.system_list:
        cases += [make_ours(ctx, num_experts, impl) for impl in impls_of(args)]
    if run_ds:
        cases.append(make_deepspeed(ctx, num_experts))
    return cases


def run_all(ctx: Ctx) -> list[dict]:
    args = ctx.args
    results: list[dict] = []
    run_ds = "deepspeed" in args.system_list
    if run_ds:
        ok, why = deepspeed_available()
        if not ok:
            if ctx.rank == 0:
                print(f"deepspeed is not importable ({why}); skipping it", flush=True)
            run_ds = False
    if run_ds and not dist.is_initialized():
        # DeepSpeed's groups need a process group even at world 1.
        store = dist.FileStore(tempfile.mktemp(prefix="bench_moe_store_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    if run_ds:
        _adopt_process_group_in_deepspeed()
    for num_experts in args.experts:
        cases = build_cases(ctx, num_experts, run_ds)
        steal = StealMeter().start()
        time_cases(ctx, cases)
        steal_frac = steal.fraction()
        recs = [record(ctx, num_experts, case) for case in cases]
        dense_ms = next((r["ms"] for r in recs if r is not None and r["system"] == "dense"), None)
        for rec in recs:
            if rec is None:
                continue
            rec["steal_frac"] = round(steal_frac, 4) if steal_frac is not None else None
            if dense_ms and rec["system"] != "dense":
                rec["ratio_to_dense"] = round(rec["ms"] / dense_ms, 3)
            emit(ctx, rec, results)
    return results


def format_table(results: list[dict]) -> str:
    head = f"{'world':>5} {'E':>4} {'system':<10} {'impl':<6} {'ms':>9} {'fwd':>8} {'bwd':>8} {'cpu':>8} " \
           f"{'x dense':>7} {'a2a ms':>7} {'a2a %':>6} {'drop %':>6} {'vs DS':>6}"
    lines = [head, "-" * len(head)]
    ds_ms = {(r["world"], r["experts"]): r["ms"] for r in results if r["system"] == "deepspeed"}
    for r in results:
        ratio = r.get("ratio_to_dense")
        a2a, share, drop = r.get("a2a_ms"), r.get("a2a_share"), r.get("drop_frac")
        ds = ds_ms.get((r["world"], r["experts"]))
        speedup = f"{ds / r['ms']:.2f}x" if (ds and r["system"] == "moetrain") else "-"
        lines.append(
            f"{r['world']:>5} {r['experts']:>4} {r['system']:<10} {(r['impl'] or '-'):<6} {r['ms']:>9.1f} "
            f"{r['fwd_ms']:>8.1f} {r['ms'] - r['fwd_ms']:>8.1f} {r['cpu_ms']:>8.1f} "
            f"{(f'{ratio:.2f}' if ratio else '-'):>7} {(f'{a2a:.1f}' if a2a is not None else '-'):>7} "
            f"{(f'{100 * share:.1f}' if share is not None else '-'):>6} "
            f"{(f'{100 * drop:.2f}' if drop is not None else '-'):>6} {speedup:>6}")
    return "\n".join(lines)


STEAL_WARN = 0.05


def format_steal(results: list[dict]) -> Optional[str]:
    """One line: hypervisor steal share while each E was timed, plus a warning when it is high."""
    steal = {r["experts"]: r.get("steal_frac") for r in results}
    known = {e: s for e, s in steal.items() if s is not None}
    if not known:
        return None
    line = "# hypervisor steal during timing: " + ", ".join(f"E={e} {100 * s:.0f}%" for e, s in known.items())
    if max(known.values()) > STEAL_WARN:
        line += ("\n# warning: the host took CPU time from this machine while timing; wall-clock ratios are "
                 "distorted (rerun when steal is low, or compare cpu_ms)")
    return line


def warn_if_loaded(threads_wanted: int) -> None:
    """Say so when other processes already keep the cores busy: wall times then include their
    share, and OpenMP's spin-waiting makes many small ops (high E) look much worse than few
    big ones (dense)."""
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads_wanted > cores + 0.5:
        print(f"# warning: load average {load:.1f} on {cores} cores before starting: wall times include "
              "other processes' share; compare cpu_ms at --threads 1, or set OMP_WAIT_POLICY=PASSIVE", flush=True)


def rank_main(args, rank: int, world: int) -> None:
    """Body of one rank (world 1 in-process, or a spawned / torchrun-launched worker)."""
    configure_cpu_process(args.threads or 0, world)   # same process settings as training
    par, group = None, None
    if world > 1:
        env = read_launch_env()
        par = init_parallel(world, 1, world, env, device_kind="cpu")
        group = par.world_group
    ctx = Ctx(args, rank, world, group, par)
    try:
        if rank == 0:
            print(f"# bench_moe: world {world}, {args.tokens} tokens/rank, dim {args.dim}, hidden {args.hidden}, "
                  f"k {args.k}, capacity factor {args.capacity_factor}, threads/rank {torch.get_num_threads()}, "
                  f"warmup {args.warmup}, iters {args.iters} (median; ms = max over ranks)", flush=True)
            warn_if_loaded(world * torch.get_num_threads())
        results = run_all(ctx)
        if rank == 0:
            print(format_table(results), flush=True)
            steal_line = format_steal(results)
            if steal_line:
                print(steal_line, flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = read_launch_env()
    if env.world_size > 1:                       # launched by torchrun / srun / mpiexec
        args.world = env.world_size
        validate(args)
        rank_main(args, env.rank, env.world_size)
        return 0
    validate(args)
    if args.world == 1:
        rank_main(args, 0, 1)
        return 0
    from tools._local_ranks import run_local_ranks
    run_local_ranks(rank_main, args, args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
