#!/usr/bin/env python
"""Hot experts and stragglers: one MoE layer's training step (forward, backward, replica gradient
sum, AdamW) at ep = --world with skewed routing, under moe.placement=static and balanced.

    python tools/bench_placement.py                          # 4 gloo ranks, zipf:1.2, 16 experts
    python tools/bench_placement.py --world 2 --skew zipf:1.5 --redundant 2
    python tools/bench_placement.py --skew hot:0.5           # half of all copies go to expert 0

Cases, each on the same process group, one after the other:
  uniform            every expert equally likely: the step time to aim for
  static             the skewed routing, rank r holds experts [r*E/ep, (r+1)*E/ep)
  balanced R=0       re-placed once from the measured load (no replicas)
  balanced R=<R>     re-placed once with R redundant replicas of the hottest experts
The balanced cases first run --settle steps (their load is the window), then re-place
(parallel/replicas.ExpertPlacer.rebalance: its decision and the all-to-all of weights and AdamW
moments are timed). Then the cases are timed round-robin (one step of each per round, --warmup
untimed rounds, then --iters timed ones), so load from other processes hits all of them alike.

Routing: the router's logits are replaced by log p_e + Gumbel noise (a fresh draw per token,
rank and step), so each token's top-k is a sample without replacement from p (Gumbel top-k):
  zipf:S   p_e proportional to 1 / (e + 1)^S      hot:F   expert 0 gets F of the mass, the rest even
  uniform  p_e = 1/E
Expert ids are the global ones, so under static placement the hot experts share rank 0.

Reported per case: `ms` the step time (median over --iters of the slowest rank's wall time from a
barrier to the end of its step), `a2a_ms` per rank (the all-to-all phases including the wait for
the slowest rank: that wait is where a straggler shows), `recv` per rank (rows its experts
processed per step), `imbalance` max/mean of recv, `cpu_ms` per rank (process CPU time of a
step), the ratio to uniform, and for balanced cases `move_ms` / `move_mb` of the re-placement
and `pays_after` = move_ms / (static ms - balanced ms) steps. One JSON line per case.

On this 2-core machine 4 ranks share 2 cores: a uniform step runs 4 ranks' work on 2 cores,
while a static skewed step leaves the cold ranks idle (gloo waits in the kernel) and the hot rank
on a core of its own; `cpu_ms` shows the work each rank did independently of that.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from moetrain.config import MoEConfig  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.moe.router import Router  # noqa: E402
from moetrain.parallel.apply import apply_ep  # noqa: E402
from moetrain.parallel.mesh import LaunchEnv, init_parallel  # noqa: E402
from moetrain.parallel.rendezvous import free_port  # noqa: E402


def parse_skew(v: str) -> tuple[str, float]:
    kind, _, val = v.partition(":")
    try:
        if kind == "uniform" and not val:
            return kind, 0.0
        if kind in ("zipf", "hot") and float(val) > 0 and (kind == "zipf" or float(val) < 1):
            return kind, float(val)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--skew must be zipf:S (S > 0), hot:F (0 < F < 1) or uniform, got {v!r}")


def expert_probs(kind: str, value: float, E: int) -> torch.Tensor:
    if kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** value
    elif kind == "hot":
        p = torch.full((E,), (1 - value) / (E - 1), dtype=torch.float64)
        p[0] = value
    else:
        p = torch.ones(E, dtype=torch.float64)
    return p / p.sum()


class SkewedRouter(Router):
    """Router whose logits are log p + Gumbel noise (a sample of top-k without replacement from p);
    the router weight still enters (times zero) so the step's backward shape is the real one's."""

    def __init__(self, moe: MoEConfig, dim: int, probs: torch.Tensor, seed: int):
        super().__init__(moe, dim)
        self.register_buffer("log_p", probs.log().float(), persistent=False)
        self.gen = torch.Generator().manual_seed(seed)

    def _logits(self, x_TD, prev_logits_TE):
        u = torch.rand(x_TD.shape[0], self.log_p.numel(), generator=self.gen).clamp_(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(u)).to(x_TD.device)
        return self.log_p + gumbel + 0.0 * torch.nn.functional.linear(x_TD, self.weight)


def build_case(args, par, placement: str, redundant: int, probs: torch.Tensor):
    moe = MoEConfig(num_experts=args.experts, top_k=args.k, capacity_factor=None, placement=placement,
                    redundant_experts=redundant, rebalance_every=args.settle, aux_loss_coef=0.0, grouped_mm="loop")
    layer = MoELayer(moe, args.dim, args.hidden)
    layer.router = SkewedRouter(moe, args.dim, probs, seed=1000 * par.rank + 17)
    holder = nn.ModuleList([layer])
    placer = apply_ep(holder, par, moe)
    with torch.no_grad():
        nn.init.normal_(layer.router.weight, std=0.02)
        for j, name in enumerate(("w1", "w3", "w2")):
            w = getattr(layer.experts, name)
            for i, e in enumerate(layer.experts.expert_ids):     # replicas of an expert are equal
                g = torch.Generator().manual_seed(7919 * e + j)
                w[i].copy_(torch.randn(w.shape[1:], generator=g) * 0.02)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4, foreach=False)
    return layer, placer, opt


def one_step(args, layer, placer, opt, x, g):
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    y, aux = layer(x)
    loss = (y * g).sum()
    loss.backward()
    if placer is not None:
        placer.add_load(aux.kept_E[None])
        placer.sync_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    a2a = sum(t for t, _ in aux.timer.totals().values())
    return ms, cpu, a2a, float(aux.recv_tokens)


def prepare_case(args, par, name, placement, redundant, probs, x, g) -> dict:
    """Build one case; a balanced one runs --settle steps and re-places from their load."""
    layer, placer, opt = build_case(args, par, placement, redundant, probs)
    case = {"name": name, "placement": placement, "redundant": redundant, "parts": (layer, placer, opt), "rows": []}
    if placer is not None:
        for _ in range(args.settle):
            one_step(args, layer, placer, opt, x, g)
        rep = placer.rebalance(args.settle, opt)
        case["move"] = (rep.ms, rep.bytes / 2 ** 20, rep.before[0], rep.after[0], rep.replicas[0], rep.ranks[0])
    return case


def summarize_case(args, par, case) -> dict:
    mine = torch.tensor(case["rows"], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(par.world)]
    dist.all_gather(every, mine)
    allr = torch.stack(every)                      # [rank, iter, (ms, cpu, a2a, recv)]
    step = allr[:, :, 0].max(0).values             # the slowest rank, per step
    med = allr.median(1).values                    # per rank
    recv = med[:, 3]
    rec = {"case": case["name"], "placement": case["placement"], "redundant": case["redundant"], "world": par.world,
           "experts": args.experts, "k": args.k, "tokens": args.tokens, "dim": args.dim, "hidden": args.hidden,
           "skew": args.skew_text, "ms": round(float(step.median()), 2), "min_ms": round(float(step.min()), 2),
           "max_ms": round(float(step.max()), 2),
           "a2a_ms": [round(float(v), 2) for v in med[:, 2]], "cpu_ms": [round(float(v), 2) for v in med[:, 1]],
           "recv": [int(v) for v in recv], "imbalance": round(float(recv.max() / recv.mean()), 3)}
    if "move" in case:
        ms, mb, before, after, replicas, ranks = case["move"]
        rec.update(move_ms=round(ms, 2), move_mb=round(mb, 3), predicted_before=round(before, 3),
                   predicted_after=round(after, 3), replicas=replicas, experts_per_rank=ranks)
    return rec


def rank_main(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    par = init_parallel(world, 1, world, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.tokens, args.dim, generator=gen)
    g = torch.randn(1, args.tokens, args.dim, generator=gen)
    skewed = expert_probs(*args.skew, args.experts)
    cases = [("uniform", "static", 0, expert_probs("uniform", 0, args.experts)),
             ("static", "static", 0, skewed),
             ("balanced R=0", "balanced", 0, skewed)]
    if args.redundant:
        cases.append((f"balanced R={args.redundant}", "balanced", args.redundant, skewed))
    prepared = [prepare_case(args, par, *c, x, g) for c in cases]
    # round-robin: one step of each case per round, so other load on the machine hits all alike
    for i in range(args.warmup + args.iters):
        for case in prepared:
            row = one_step(args, *case["parts"], x, g)
            if i >= args.warmup:
                case["rows"].append(row)
    out = [summarize_case(args, par, case) for case in prepared]
    if rank == 0:
        base = out[0]["ms"]
        static = out[1]["ms"]
        for rec in out:
            rec["vs_uniform"] = round(rec["ms"] / base, 3)
            if "move_ms" in rec:
                saved = static - rec["ms"]
                rec["pays_after_steps"] = round(rec["move_ms"] / saved, 2) if saved > 0 else None
        if args.json:                    # before printing: a closed stdout (| head) must not lose them
            with open(args.json, "a") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in out)
        print(f"{'case':<14} {'ms':>8} {'x uniform':>9} {'imbalance':>9}  recv rows per rank / a2a ms per rank")
        for rec in out:
            print(f"{rec['case']:<14} {rec['ms']:8.1f} {rec['vs_uniform']:9.2f} {rec['imbalance']:9.2f}  "
                  f"{rec['recv']} / {rec['a2a_ms']}"
                  + (f"  move {rec['move_ms']:.1f} ms {rec['move_mb']:.2f} MB, pays after "
                     f"{rec['pays_after_steps']} steps" if "move_ms" in rec else ""))
        for rec in out:
            print(json.dumps(rec))
    # every rank tears down together: a gloo peer closing its pairs while another rank's group is
    # being destroyed aborted that rank once in CI ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4, help="ranks (ep = world)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--skew", type=parse_skew, default="zipf:1.2")
    p.add_argument("--redundant", type=int, default=4, help="R of the replicated balanced case (0: none)")
    p.add_argument("--settle", type=int, default=2, help="steps whose load chooses the balanced placement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    kind, value = args.skew
    args.skew_text = kind if kind == "uniform" else f"{kind}:{value:g}"
    E, W = args.experts, args.world
    problems = []
    if W < 2:
        problems.append("--world must be >= 2 (placement needs expert parallelism)")
    if E % W or (E + args.redundant) % W:
        problems.append(f"--experts {E} and --experts + --redundant {E + args.redundant} must divide by --world {W}")
    if args.redundant < 0 or args.redundant > E * (W - 1):
        problems.append(f"--redundant must be in 0..{E * (W - 1)}")
    if min(args.k, args.tokens, args.dim, args.hidden, args.iters, args.settle, args.threads) < 1 or args.k > E:
        problems.append("--k (<= --experts), --tokens, --dim, --hidden, --iters, --settle, --threads must be >= 1")
    if problems:
        print(f"bench_placement: error: {problems[0]}", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp
    mp.start_processes(rank_main, args=(W, free_port(), args), nprocs=W, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
