#!/usr/bin/env python
"""Forward+backward timing of moetrain's MoELayer against a dense FFN of equal active FLOPs and
against DeepSpeed's MoE layer, on CPU (fp32) or on a CUDA GPU (bf16 autocast), at world size 1
or N ranks.

    python tools/bench_moe.py                                   # CPU, world 1, E = 8,32,128
    python tools/bench_moe.py --world 2 --experts 8,64,128      # spawns 2 gloo ranks, ep = 2
    torchrun --nproc_per_node 2 tools/bench_moe.py              # same, launched by torchrun
    python tools/bench_moe.py --tokens 64 --dim 16 --hidden 32 --experts 4 --warmup 0 --iters 1
    python tools/bench_moe.py --device cuda                     # GPU sizes: 16384 tokens, dim 2048,
    python tools/bench_moe.py --device cuda --k 8 --experts 128 #   hidden 1408, k 2, E = 8,32,128
    python tools/bench_moe.py --device cuda --world 2 --backend gloo   # 2 ranks sharing one GPU

Systems (every rank runs its own `--tokens` tokens; experts are sharded ep = world):
  moetrain   moetrain.moe.layer.MoELayer (grouped_mm = --impl: auto, loop, bmm, grouped or a
             comma list; `all` = loop,bmm on cpu and grouped,bmm,loop on cuda), sharded with
             apply_ep over a Parallel from init_parallel. a2a_ms = sum of the CommTimer phases
             (counts, dispatch, combine and their backward) read after the timed steps.
             grouped (torch._grouped_mm, bf16 even on CPU) needs dim and hidden multiples of 8;
             where it cannot run (unaligned sizes, or the kernel refuses them in a small trial
             run) it is skipped with a printed reason.
  dense      moetrain.moe.experts.SwiGLU(dim, hidden) on the input repeated k times: the FLOPs an
             MoE layer with no capacity padding and no drops spends on its experts.
  deepspeed  deepspeed.moe.layer.MoE with an `expert=` SwiGLU of the same sizes, same E, k,
             capacity factor (none -> drop_tokens=False), min_capacity, ep_size = world,
             use_rts=False and top2_2nd_expert_sampling=False. Router and expert weights are
             copied from ours. Without drops both route alike; with drops DeepSpeed keeps another
             token set at top-1 and renormalizes surviving top-2 weights (README, "Routing:
             where we differ from DeepSpeed"), so its kept rows and weights differ slightly.

Each step: forward, loss = <y, g> + 0.01 * aux_loss (g fixed), backward into the parameters and
the input; gradients are set to None before each step (outside the timed region). Ranks meet at
a barrier before each step. Reported `ms` is the max over ranks of each rank's median over
`--iters` steps after `--warmup` untimed steps. No data-parallel gradient reduction is timed:
this is the layer alone. Nothing the benchmark itself reads from a step (drop share, kept rows,
all-to-all times) is read inside the timed region: those values are read after it.

Devices (--device, default cpu):
  cpu   fp32 throughout. Wall clock (time.perf_counter) around each step; systems are timed
        round-robin (one step of each per round, see Noise). Defaults: --tokens 4096 --dim 256
        --hidden 512 --warmup 2 --iters 5.
  cuda  bf16 as training runs it: the forward under torch.autocast("cuda", dtype=torch.bfloat16)
        with fp32 master weights (parameters and their gradients stay fp32) and an fp32 input;
        backward outside autocast. Every tensor handed to a layer or a collective is on the GPU.
        Each step is bracketed by CUDA events (torch.cuda.Event(enable_timing=True), plus one
        after the forward) on the current stream; they are read after one torch.cuda.synchronize()
        at the end of each system's timed loop, never per step. Systems are timed one after the
        other, each built just before its block (untimed warmup, then the timed loop) and freed
        after it, with torch.cuda.synchronize() between systems (GPU time is not disturbed by
        other processes' CPU load the way CPU time is, and only one system's weights, gradients
        and activations occupy the GPU at a time). cpu_ms is then the host's CPU time to issue a
        step (launches, plus the layers' own host syncs, which may spin). DeepSpeed's gate runs
        with autocast off: its routing math casts to fp32 by design, which autocast would undo;
        moetrain's gate also routes in fp32. Defaults when not given: --tokens 16384 --dim 2048
        --hidden 1408 --warmup 3 --iters 10 (k 2 and E 8,32,128 as on CPU; k 8 at E 128 is
        `--k 8 --experts 128`).
  DS_ACCELERATOR is set to the --device value before deepspeed is imported (DeepSpeed picks its
  accelerator at import time).

World > 1: gloo ranks on CPU. On cuda, ranks that share one GPU cannot use NCCL ("Duplicate GPU
detected"), so world > 1 on cuda needs an explicit --backend:
  gloo  rank r uses GPU r % (visible GPUs). init_parallel picks NCCL for CUDA devices (and
        refuses more ranks than GPUs), so this tool creates the process group itself,
        dist.init_process_group("cpu:gloo,cuda:gloo"), and then takes the mesh and groups from
        init_parallel(device_kind="cpu") on that group. All-to-all times are gloo's (through host
        memory), and ranks share the GPU's compute: not what separate GPUs would show.
  nccl  one GPU per rank (torchrun on a multi-GPU node): init_parallel(device_kind="cuda"), as
        training.
--backend gloo on CPU takes the same self-made "cpu:gloo,cuda:gloo" group path.

TFLOP/s (`tflops`): expert math only. FLOPs of a forward+backward step = 3 (forward + 2x
backward) * 2 * rows * (3 * dim * hidden), rows = the rows the experts process usefully:
  dense      tokens * k.
  moetrain   the kept copies the layer reports (MoEAux.kept_E summed over the FFN experts: equal to
             tokens * k when dropless, fewer when capacity drops copies); tokens * k if the layer
             does not report them.
  deepspeed  the kept copies counted from its gate's routes in one extra untimed forward after
             the timed steps (routes with an expert index >= 0, or the dispatch mask's sum on
             DeepSpeed versions without sparse routes); tokens * k where neither can be read.
             DeepSpeed computes its experts over E * capacity padded rows: the padding is not
             counted, so its TFLOP/s is useful throughput.
At world > 1 rows is the mean over ranks (each rank's experts process what all ranks kept for
them) and ms the slowest rank's: TFLOP/s per rank at the pace of the slowest. `expert_rows` and
`expert_rows_from` ("kept" or "tokens*k") in the record say which was used.

Output: a table on stdout, and one JSON object per measurement on its own line (also appended to
`--json FILE`), with keys system, experts, tokens (per rank), world, ms, fwd_ms, min_ms, cpu_ms,
impl, k, dim, hidden, capacity_factor, min_capacity, a2a_ms (moetrain at world > 1, else null),
a2a_share (= a2a_ms / ms), ratio_to_dense (ms / dense ms at the same E and world), drop_frac,
threads, ms_per_rank, loadavg_1m, steal_frac (hypervisor steal time over that E's timed steps,
from /proc/stat; null where unknown), tflops, expert_rows, expert_rows_from, device (cpu | cuda),
dtype (fp32 | bf16-autocast), backend (the process group's at world > 1, else null) and gpu
(null on cpu; on cuda {name: torch.cuda.get_device_name, capability, torch: torch.__version__,
cuda: torch.version.cuda}).

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
import gc
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moetrain.cpu_runtime import configure_cpu_process  # noqa: E402
from moetrain.config import MoEConfig  # noqa: E402
from moetrain.errors import first_line  # noqa: E402
from moetrain.moe.experts import SwiGLU  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.parallel.apply import apply_ep  # noqa: E402
from moetrain.parallel.mesh import init_parallel, read_launch_env  # noqa: E402
from tools._cpu_steal import StealMeter  # noqa: E402

SYSTEMS = ("dense", "moetrain", "deepspeed")
IMPLS = ("auto", "loop", "bmm", "grouped")
ALL_IMPLS = {"cpu": ["loop", "bmm"], "cuda": ["grouped", "bmm", "loop"]}
DEVICE_DEFAULTS = {
    "cpu": {"tokens": 4096, "dim": 256, "hidden": 512, "warmup": 2, "iters": 5},
    "cuda": {"tokens": 16384, "dim": 2048, "hidden": 1408, "warmup": 3, "iters": 10},
}
GROUPED_ALIGN = 8          # torch._grouped_mm: bf16 rows 16-byte aligned
GLOO_BOTH = "cpu:gloo,cuda:gloo"
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


def parse_impls(v: str) -> list[str]:
    names = [s.strip() for s in v.split(",") if s.strip()]
    if names == ["all"]:
        return names
    if not names or any(n not in IMPLS for n in names):
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma-separated subset of {','.join(IMPLS)}, "
                                         f"got {v!r}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu, gpu = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]

    def dflt(name: str) -> str:
        return f"(default {cpu[name]} on cpu, {gpu[name]} on cuda)"

    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: fp32 (default); cuda: bf16 autocast, CUDA-event timing")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank " + dflt("tokens"))
    p.add_argument("--dim", type=int, default=None, help=dflt("dim"))
    p.add_argument("--hidden", type=int, default=None, help="expert hidden size " + dflt("hidden"))
    p.add_argument("--experts", type=parse_int_list, default=[8, 32, 128], help="e.g. 8,32,128")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--capacity-factor", type=parse_capacity, default=1.25,
                   help="float, or 'none' for dropless (default 1.25)")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--impl", type=parse_impls, default="all",
                   help="GroupedExperts grouped_mm for moetrain: auto, loop, bmm, grouped, a comma list, "
                        "or 'all' = loop,bmm on cpu and grouped,bmm,loop on cuda (default)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--world", type=int, default=1, help="ranks to spawn (ep = world)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="process group at world > 1: cpu uses gloo; cuda needs it given: gloo (ranks may "
                        "share a GPU) or nccl (one GPU per rank)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: the cores this process may use // world, as training)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per system " + dflt("warmup"))
    p.add_argument("--iters", type=int, default=None, help="timed steps per system " + dflt("iters"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    return p


def apply_device_defaults(args) -> None:
    """Sizes and step counts the user did not give take --device's defaults."""
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    apply_device_defaults(args)
    return args


def validate(args, local_world: Optional[int] = None) -> None:
    """One-line refusals (SystemExit) before any process group, GPU context or deepspeed import.
    local_world: ranks on this node (default: --world, as spawned here)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device is available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'})")
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
    if args.backend == "nccl" and args.device != "cuda":
        raise SystemExit("--backend nccl needs --device cuda (CPU ranks use gloo)")
    if args.device == "cuda" and args.world > 1:
        if args.backend is None:
            raise SystemExit(f"--device cuda at world {args.world}: pass --backend gloo (ranks may share a GPU; "
                             "NCCL refuses that with 'Duplicate GPU detected') or --backend nccl (one GPU per rank)")
        gpus, local = torch.cuda.device_count(), local_world or args.world
        if args.backend == "nccl" and local > gpus:
            raise SystemExit(f"--backend nccl needs one GPU per rank: {local} ranks on this node, {gpus} GPU(s) "
                             "visible; use --backend gloo to share GPUs")


# ----------------------------------------------------------------------------- device

class WallClock:
    """CPU: the host's wall clock at each mark, readable at once."""

    @staticmethod
    def stamp() -> float:
        return time.perf_counter()

    @staticmethod
    def ms(a: float, b: float) -> float:
        return (b - a) * 1e3

    @staticmethod
    def sync() -> None:
        pass


class EventClock:
    """CUDA: an event recorded on the current stream at each mark. ms() is only valid after
    sync() (elapsed_time of an event that has not completed raises). `event` and `synchronize`
    are injectable so the bookkeeping can be dry-run without a GPU."""

    def __init__(self, device: torch.device, event: Optional[Callable[[], object]] = None,
                 synchronize: Optional[Callable[[], None]] = None):
        self.device = device
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(device))

    def stamp(self):
        ev = self._event()
        ev.record()
        return ev

    @staticmethod
    def ms(a, b) -> float:
        return a.elapsed_time(b)

    def sync(self) -> None:
        self._synchronize()


@dataclass
class Runtime:
    """Where and how the layers run: device, autocast dtype (None = off), clock, and whether
    systems are timed one block each (cuda) or round-robin (cpu)."""
    device: torch.device
    clock: object
    blocks: bool = False
    amp_dtype: Optional[torch.dtype] = None
    gpu: Optional[dict] = None

    @property
    def dtype_name(self) -> str:
        if self.amp_dtype is None:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, str(self.amp_dtype)) + "-autocast"

    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def build(self):
        """Context in which modules are constructed (parameters land on the device directly)."""
        return contextlib.nullcontext() if self.device.type == "cpu" else torch.device(self.device)

    def sync(self) -> None:
        self.clock.sync()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def gpu_info(device: torch.device) -> dict:
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def make_runtime(args, local_rank: int) -> Runtime:
    if args.device == "cpu":
        return Runtime(torch.device("cpu"), WallClock())
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return Runtime(device, EventClock(device), blocks=True, amp_dtype=torch.bfloat16, gpu=gpu_info(device))


# ----------------------------------------------------------------------------- timing

class Ctx:
    """What a rank needs to run and report: its rank/world, the world group (None at world 1),
    and the runtime (device, clock, autocast)."""

    def __init__(self, args, rank: int, world: int, group, par, rt: Optional[Runtime] = None):
        self.args, self.rank, self.world, self.group, self.par = args, rank, world, group, par
        self.rt = rt if rt is not None else Runtime(torch.device("cpu"), WallClock())

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
    """One system ready to run. `step(mark_forward)` does forward+backward, calling mark_forward()
    between them, and returns extras: values, or zero-argument callables read only after the
    timed loop (so a step never waits for the device on the benchmark's behalf)."""
    system: str
    impl: Optional[str]
    params: list
    x: torch.Tensor
    step: Callable[[Callable[[], None]], dict]
    rows: float = 0.0                                # expert rows per step when nothing better is known
    rows_probe: Optional[Callable[[], Optional[float]]] = None   # kept rows from one untimed forward
    pending: list = field(default_factory=list)     # (t0, t_fwd, t1, cpu_ms, extras) per timed step, unread
    samples: list = field(default_factory=list)     # (total_ms, fwd_ms, cpu_ms, extras) per timed step


def run_case_once(ctx: Ctx, case: Case, timed: bool) -> None:
    clock = ctx.rt.clock
    for p in case.params:
        p.grad = None
    case.x.grad = None
    ctx.barrier()
    marks: list = []
    c0 = time.process_time()
    t0 = clock.stamp()
    extra = case.step(lambda: marks.append(clock.stamp()))
    t1 = clock.stamp()
    c1 = time.process_time()
    if timed:
        case.pending.append((t0, marks[0] if marks else t1, t1, (c1 - c0) * 1e3, extra))


def resolve(ctx: Ctx, case: Case) -> None:
    """After the timed loop: one synchronize, then read the clock marks and the extras."""
    ctx.rt.sync()
    clock = ctx.rt.clock
    for t0, t_fwd, t1, cpu_ms, extra in case.pending:
        values = {k: (v() if callable(v) else v) for k, v in extra.items()}
        case.samples.append((clock.ms(t0, t1), clock.ms(t0, t_fwd), cpu_ms, values))
    case.pending.clear()


def time_cases(ctx: Ctx, cases: list[Case]) -> None:
    """Warm every case up, then time them round-robin (one step of each per round), so a burst
    of load from elsewhere on a shared machine hits all systems alike instead of one of them."""
    for _ in range(ctx.args.warmup):
        for case in cases:
            run_case_once(ctx, case, timed=False)
    for _ in range(ctx.args.iters):
        for case in cases:
            run_case_once(ctx, case, timed=True)
    for case in cases:
        resolve(ctx, case)


def time_block(ctx: Ctx, case: Case) -> None:
    """One system alone: untimed warmup, then the timed loop, read after one synchronize."""
    ctx.rt.sync()
    for _ in range(ctx.args.warmup):
        run_case_once(ctx, case, timed=False)
    ctx.rt.sync()
    for _ in range(ctx.args.iters):
        run_case_once(ctx, case, timed=True)
    resolve(ctx, case)


def summarize(ctx: Ctx, case: Case) -> dict:
    """This rank's medians over the timed steps, and the expert rows of a step."""
    totals = [s[0] for s in case.samples]
    out = {"ms": statistics.median(totals), "min_ms": min(totals),
           "fwd_ms": statistics.median(s[1] for s in case.samples),
           "cpu_ms": statistics.median(s[2] for s in case.samples)}
    for key in (case.samples[0][3] if case.samples else {}):
        vals = [s[3][key] for s in case.samples if s[3].get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    rows = out.pop("kept_rows", None)
    if rows is None and case.rows_probe is not None:
        rows = case.rows_probe()          # every rank calls it, in the same order (it may communicate)
    out["rows"], out["rows_from"] = (rows, "kept") if rows is not None else (case.rows, "tokens*k")
    return out


# ----------------------------------------------------------------------------- systems

def make_input(ctx: Ctx, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn on the CPU from a per-rank generator (the same values on every device), then moved."""
    g = torch.Generator().manual_seed(ctx.args.seed * 7919 + ctx.rank)
    dev = ctx.rt.device
    x = torch.randn(1, ctx.args.tokens, dim, generator=g).to(dev).requires_grad_(True)
    grad_out = torch.randn(1, ctx.args.tokens, dim, generator=g).to(dev)
    return x, grad_out


def build_ours(args, num_experts: int, impl: str) -> MoELayer:
    """Full layer, identical on every rank (seeded), initialized before sharding. Built inside
    Runtime.build() it is created on the device (seeded by the same torch.manual_seed)."""
    torch.manual_seed(args.seed)
    layer = MoELayer(MoEConfig(num_experts=num_experts, top_k=args.k, capacity_factor=args.capacity_factor,
                               min_capacity=args.min_capacity, grouped_mm=impl), args.dim, args.hidden)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, INIT_STD)
        for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
            w.normal_(0.0, INIT_STD)
    return layer


def make_dense(ctx: Ctx, num_experts: int) -> Case:
    args, rt = ctx.args, ctx.rt
    with rt.build():
        torch.manual_seed(args.seed)
        ffn = SwiGLU(args.dim, args.hidden)
    x, g = make_input(ctx, args.dim)
    g_rep = g.reshape(-1, args.dim).repeat(args.k, 1)

    def step(mark):
        with rt.amp():
            y = ffn(x.reshape(-1, args.dim).repeat(args.k, 1))
        mark()
        (y * g_rep).sum().backward()
        return {}

    return Case("dense", None, list(ffn.parameters()), x, step, rows=float(args.tokens * args.k))


def _ours_extras(aux, num_experts: int, world: int) -> dict:
    """What to read from the layer's aux after the timed loop (tensors and CUDA events stay unread
    until then: reading them in the step would wait for the device)."""
    timer = aux.timer if world > 1 else None
    kept = getattr(aux, "kept_E", None)             # copies kept per expert (FFN, then zero-computation)
    copies = getattr(aux, "num_copies", None)
    return {
        "a2a_ms": (lambda: sum(ms for ms, _ in timer.totals().values())) if timer is not None else None,
        "drop_frac": (lambda: 1.0 - float(kept.sum()) / max(1, int(copies)))
        if kept is not None and copies is not None else None,
        "kept_rows": (lambda: float(kept[:num_experts].sum())) if kept is not None else None,
    }


def make_ours(ctx: Ctx, num_experts: int, impl: str) -> Case:
    args, rt = ctx.args, ctx.rt
    with rt.build():
        layer = build_ours(args, num_experts, impl)
    layer.train()
    if ctx.par is not None:
        apply_ep(layer, ctx.par)
    x, g = make_input(ctx, args.dim)

    def step(mark):
        with rt.amp():
            y, aux = layer(x)
        mark()
        ((y * g).sum() + AUX_COEF * aux.aux_loss).backward()
        return _ours_extras(aux, num_experts, ctx.world)

    return Case("moetrain", impl, list(layer.parameters()), x, step, rows=float(args.tokens * args.k))


def grouped_skip_reason(ctx: Ctx) -> Optional[str]:
    """Why moetrain's grouped impl (torch._grouped_mm) cannot run these sizes here, or None.
    Checks the alignment the kernel needs, then runs a small layer of the same dim and hidden
    (2 experts, 64 tokens) forward and backward; a RuntimeError (the kernel's refusal) is the
    reason. Other errors propagate: they are bugs, not refusals."""
    args, rt = ctx.args, ctx.rt
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    bad = [f"{name} {v}" for name, v in (("dim", args.dim), ("hidden", args.hidden)) if v % GROUPED_ALIGN]
    if bad:
        return (f"torch._grouped_mm needs dim and expert hidden multiples of {GROUPED_ALIGN} "
                f"(16-byte aligned bf16 rows): {', '.join(bad)}")
    try:
        with rt.build():
            torch.manual_seed(args.seed)
            layer = MoELayer(MoEConfig(num_experts=2, top_k=1, capacity_factor=None, grouped_mm="grouped"), args.dim,
                             args.hidden)
            with torch.no_grad():
                for w in (layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2):
                    w.normal_(0.0, INIT_STD)
        x = torch.randn(1, 64, args.dim, device=rt.device, requires_grad=True)
        with rt.amp():
            y, aux = layer(x)
        (y.float().sum() + AUX_COEF * aux.aux_loss).backward()
        rt.sync()
    except RuntimeError as exc:
        return f"torch._grouped_mm refused dim {args.dim}, hidden {args.hidden} on {rt.device.type}: {first_line(exc)}"
    finally:
        layer = x = y = aux = None     # noqa: F841  (free before the real cases)
        rt.free()
    return None


def deepspeed_available(device_type: str) -> tuple[bool, str]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import deepspeed  # noqa: F401
            import deepspeed.moe.layer  # noqa: F401
            from deepspeed.accelerator import get_accelerator
            accel = get_accelerator().device_name()
    except Exception as exc:  # ImportError, or an accelerator/setup error at import time
        return False, f"{type(exc).__name__}: {first_line(exc)}"
    if accel != device_type:
        return False, (f"deepspeed was imported earlier in this process with the {accel!r} accelerator, "
                       f"not {device_type!r} (DS_ACCELERATOR is read at import)")
    return True, ""


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _adopt_process_group_in_deepspeed(backend: str) -> None:
    """deepspeed.comm keeps its own backend object; with torch.distributed already initialized
    init_distributed only wraps the existing default group (no new rendezvous)."""
    import deepspeed
    _quiet_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _route_in_fp32(gate, device_type: str) -> None:
    """Run DeepSpeed's gate with autocast off: it casts input and weight to fp32 itself (its
    routing is written for fp32), which autocast would undo by running the linear in bf16."""
    forward = gate.forward

    def fp32_forward(*a, **kw):
        with torch.autocast(device_type, enabled=False):
            return forward(*a, **kw)

    gate.forward = fp32_forward


def ds_kept_rows(ctx: Ctx, moe, x: torch.Tensor) -> Optional[float]:
    """Copies DeepSpeed's gate keeps, from one untimed forward (no grad). Sparse routes (l_aux,
    capacity, E, indices [K, S], locations, gates, counts): indices >= 0 are kept. Dense routes
    (l_aux, combine_weights, dispatch_mask [S, E, C], counts): the mask's sum. Else None."""
    found: list = []

    def hook(_mod, _inp, out):
        if isinstance(out, tuple) and len(out) >= 7 and torch.is_tensor(out[3]):
            found.append(float((out[3] >= 0).sum()))
        elif isinstance(out, tuple) and len(out) == 4 and torch.is_tensor(out[2]) and out[2].dtype == torch.bool:
            found.append(float(out[2].sum()))

    handle = moe.deepspeed_moe.gate.register_forward_hook(hook)
    try:
        with torch.no_grad(), ctx.rt.amp():
            moe(x)
    finally:
        handle.remove()
    ctx.rt.sync()
    return found[0] if len(found) == 1 else None


def make_deepspeed(ctx: Ctx, num_experts: int) -> Case:
    from deepspeed.moe.layer import MoE
    _quiet_deepspeed()
    args, rt = ctx.args, ctx.rt
    with rt.build():
        ours = build_ours(args, num_experts, "loop")      # only for its weights, made as moetrain's are
    local = num_experts // ctx.world
    first = ctx.rank * local                               # DS all-to-all layout: rank r owns [r*L, (r+1)*L)
    cf = args.capacity_factor
    with contextlib.redirect_stdout(io.StringIO()):        # built on the CPU, moved below
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
    rt.free()
    moe.to(rt.device)
    if rt.amp_dtype is not None:
        _route_in_fp32(moe.deepspeed_moe.gate, rt.device.type)
    moe.train()
    x, g = make_input(ctx, args.dim)

    def step(mark):
        with rt.amp():
            y, l_aux, _ = moe(x)
        mark()
        ((y * g).sum() + AUX_COEF * l_aux).backward()
        return {}

    return Case("deepspeed", "padded", list(moe.parameters()), x, step, rows=float(args.tokens * args.k),
                rows_probe=lambda: ds_kept_rows(ctx, moe, x))


# ----------------------------------------------------------------------------- driver

def impls_of(args) -> list[str]:
    return list(ALL_IMPLS[args.device]) if args.impl == ["all"] else list(args.impl)


def moetrain_impls(ctx: Ctx) -> list[str]:
    """The impls to time; grouped is dropped, with a printed reason, where it cannot run."""
    impls = impls_of(ctx.args)
    if "moetrain" in ctx.args.system_list and "grouped" in impls:
        why = grouped_skip_reason(ctx)
        if why:
            if ctx.rank == 0:
                print(f"# skipping moetrain impl grouped: {why}", flush=True)
            impls.remove("grouped")
    return impls


def expert_tflops(rows: float, dim: int, hidden: int, ms: float) -> float:
    """3 (fwd + 2x bwd) * 2 * rows * (3 * dim * hidden) FLOPs in `ms`, as TFLOP/s."""
    flops = 3 * 2 * rows * 3 * dim * hidden
    return float(f"{flops / (ms * 1e9):.4g}") if ms > 0 else 0.0


def record(ctx: Ctx, num_experts: int, case: Case) -> Optional[dict]:
    """Gather per-rank medians; on rank 0 return the JSON record (the slowest rank's numbers)."""
    per_rank = ctx.gather(summarize(ctx, case))
    if ctx.rank != 0:
        return None
    a, rt = ctx.args, ctx.rt
    slowest = max(per_rank, key=lambda r: r["ms"])
    a2a_vals = [r.get("a2a_ms") for r in per_rank if r.get("a2a_ms") is not None]
    rows = statistics.fmean(r["rows"] for r in per_rank)
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
        "tflops": expert_tflops(rows, a.dim, a.hidden, slowest["ms"]),
        "expert_rows": round(rows, 1),
        "expert_rows_from": "kept" if all(r["rows_from"] == "kept" for r in per_rank) else "tokens*k",
        "device": rt.device.type, "dtype": rt.dtype_name,
        "backend": dist.get_backend(ctx.group) if ctx.group is not None else None,
        "gpu": rt.gpu,
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


def case_factories(ctx: Ctx, num_experts: int, run_ds: bool, impls: list[str]) -> list[Callable[[], Case]]:
    args = ctx.args
    makers: list[Callable[[], Case]] = []
    if "dense" in args.system_list:
        makers.append(lambda: make_dense(ctx, num_experts))
    if "moetrain" in args.system_list:
        makers += [(lambda impl=impl: make_ours(ctx, num_experts, impl)) for impl in impls]
    if run_ds:
        makers.append(lambda: make_deepspeed(ctx, num_experts))
    return makers


def run_all(ctx: Ctx) -> list[dict]:
    args, rt = ctx.args, ctx.rt
    results: list[dict] = []
    run_ds = "deepspeed" in args.system_list
    if run_ds:
        ok, why = deepspeed_available(rt.device.type)
        if not ok:
            if ctx.rank == 0:
                print(f"deepspeed is not importable ({why}); skipping it", flush=True)
            run_ds = False
    if run_ds and not dist.is_initialized():
        # DeepSpeed's groups need a process group even at world 1 (gloo serves CPU and CUDA tensors).
        store = dist.FileStore(tempfile.mktemp(prefix="bench_moe_store_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    if run_ds:
        _adopt_process_group_in_deepspeed("nccl" if args.backend == "nccl" and ctx.world > 1 else "gloo")
    impls = moetrain_impls(ctx)
    for num_experts in args.experts:
        makers = case_factories(ctx, num_experts, run_ds, impls)
        steal = StealMeter().start()
        if rt.blocks:           # cuda: one system at a time, synchronized and freed between systems
            recs = []
            for make in makers:
                case = make()
                time_block(ctx, case)
                recs.append(record(ctx, num_experts, case))
                case = None
                rt.sync()
                rt.free()
            steal_frac = steal.fraction()
        else:                   # cpu: round-robin
            cases = [make() for make in makers]
            time_cases(ctx, cases)
            steal_frac = steal.fraction()
            recs = [record(ctx, num_experts, case) for case in cases]
            cases = None
        dense_ms = next((r["ms"] for r in recs if r is not None and r["system"] == "dense"), None)
        for rec in recs:
            if rec is None:
                continue
            rec["steal_frac"] = round(steal_frac, 4) if steal_frac is not None else None
            if dense_ms and rec["system"] != "dense":
                rec["ratio_to_dense"] = round(rec["ms"] / dense_ms, 3)
            emit(ctx, rec, results)
    return results


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def format_table(results: list[dict]) -> str:
    head = f"{'world':>5} {'E':>4} {'system':<10} {'impl':<7} {'ms':>9} {'fwd':>8} {'bwd':>8} {'cpu':>8} " \
           f"{'TFLOP/s':>8} {'x dense':>7} {'a2a ms':>7} {'a2a %':>6} {'drop %':>6} {'vs DS':>6}"
    lines = [head, "-" * len(head)]
    ds_ms = {(r["world"], r["experts"]): r["ms"] for r in results if r["system"] == "deepspeed"}
    for r in results:
        ratio = r.get("ratio_to_dense")
        a2a, share, drop = r.get("a2a_ms"), r.get("a2a_share"), r.get("drop_frac")
        ds = ds_ms.get((r["world"], r["experts"]))
        speedup = f"{ds / r['ms']:.2f}x" if (ds and r["system"] == "moetrain") else "-"
        lines.append(
            f"{r['world']:>5} {r['experts']:>4} {r['system']:<10} {(r['impl'] or '-'):<7} {r['ms']:>9.1f} "
            f"{r['fwd_ms']:>8.1f} {r['ms'] - r['fwd_ms']:>8.1f} {r['cpu_ms']:>8.1f} "
            f"{_fmt(r.get('tflops'), '.3g'):>8} "
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


def _init_gloo_process_group(env) -> None:
    """The default group on gloo for both CPU and CUDA tensors. init_parallel would pick NCCL for
    a CUDA device (and refuse more ranks than GPUs), so world > 1 with --backend gloo makes the
    group here and lets init_parallel build the mesh on it (it skips an initialized group)."""
    from moetrain.parallel import mesh
    ensure = getattr(mesh, "_ensure_rendezvous", None)      # srun / mpiexec: MASTER_ADDR/PORT
    if ensure is not None:
        ensure(env)
    timeout = mesh._timeout(None) if hasattr(mesh, "_timeout") else timedelta(seconds=600)
    dist.init_process_group(GLOO_BOTH, rank=env.rank, world_size=env.world_size, timeout=timeout)


def init_group(args, env, world: int):
    """The Parallel (mesh, groups) of world > 1 ranks, on the backend --device/--backend ask for."""
    if args.backend == "gloo":
        _init_gloo_process_group(env)
        return init_parallel(world, 1, world, env, device_kind="cpu")
    return init_parallel(world, 1, world, env, device_kind=args.device)   # cpu: gloo; cuda: nccl


def describe(rt: Runtime) -> str:
    if rt.gpu is None:
        return f"{rt.device.type} {rt.dtype_name}"
    g = rt.gpu
    return (f"{rt.device} {g['name']} (sm {g['capability']}, torch {g['torch']}, CUDA {g['cuda']}) "
            f"{rt.dtype_name}")


def rank_main(args, rank: int, world: int) -> None:
    """Body of one rank (world 1 in-process, or a spawned / torchrun-launched worker)."""
    os.environ["DS_ACCELERATOR"] = args.device        # before any deepspeed import (spawned ranks inherit it too)
    configure_cpu_process(args.threads or 0, world)   # same process settings as training
    env = read_launch_env()
    rt = make_runtime(args, env.local_rank)
    par, group = None, None
    if world > 1:
        par = init_group(args, env, world)
        group = par.world_group
    ctx = Ctx(args, rank, world, group, par, rt)
    try:
        if rank == 0:
            print(f"# bench_moe: {describe(rt)}, world {world}, {args.tokens} tokens/rank, dim {args.dim}, "
                  f"hidden {args.hidden}, k {args.k}, capacity factor {args.capacity_factor}, "
                  f"threads/rank {torch.get_num_threads()}, warmup {args.warmup}, iters {args.iters} "
                  f"(median; ms = max over ranks)", flush=True)
            if rt.device.type == "cpu":
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
    args = parse_args(argv)
    os.environ["DS_ACCELERATOR"] = args.device        # DeepSpeed reads it when first imported
    env = read_launch_env()
    if env.world_size > 1:                       # launched by torchrun / srun / mpiexec
        args.world = env.world_size
        validate(args, env.local_world_size)
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
