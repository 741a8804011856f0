#!/usr/bin/env python
"""One command that tells whether moetrain works on this machine's GPU (tools/gpu_check.sh).

    bash tools/gpu_check.sh                  # one CUDA GPU, project installed: ~5-8 min on an H100
    bash tools/gpu_check.sh --dry-run        # the same commands at toy sizes on the CPU (CI runs it)
    bash tools/gpu_check.sh --only syncs,layouts --out DIR

Steps (each a subprocess with a time limit; a failed step does not stop the others):
  env          GPU name, compute capability, torch / CUDA / NCCL / deepspeed versions
  pytest_gpu   pytest -m gpu (the GPU-marked tests: grouped GEMM forward and backward with empty
               experts, CUDA's sync detector over a training step, ...)
  impls        world-1 training, 60 steps, bf16 autocast, with each expert implementation
               (grouped, bmm, loop): finite, learning, and the three final losses within 3%
  recipes      every shipped recipe in configs/ (30 steps)
  deepspeed    train.engine=deepspeed, ZeRO-1 (30 steps)
  checkpoint   20 steps saving at 10 and 20, then a second run resumed from step 10: its losses
               for steps 11-20 equal the first run's bit for bit (train.deterministic)
  snapshot     ep 2 over cuda:gloo with in-memory snapshots every 2 steps, no disk checkpoints;
               a second run recovers the snapshot before the last: its losses equal bit for bit
  layouts      2 and 4 ranks on the one GPU over cuda:gloo (ep=2, ep=4, tp=2 x ep=2, FSDP),
               fp32 + train.deterministic, dropless: each loss curve equals world 1's (rtol 1e-4)
  bench        tools/bench_moe.py --device cuda at the issue's sizes (k=2, E=8,32,128; k=8 at E=128)
  syncs        tools/count_syncs.py: host syncs per MoE layer and micro-step of a training step,
               world 1 (0 on the grouped path, else 1) and ep=2 over cuda:gloo (1)

Writes <out>/gpu_check.json (the summary: machine, each step's ok / seconds / numbers / error)
and the runs under <out>/; exits 1 when a step failed, 2 when there is no GPU (without --dry-run).
--dry-run: device cpu, gloo, toy model sizes, 2-4 steps: proves the commands and the checks run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_SKIP = {"tiny_cpu.yaml"}          # the default config, trained by `impls`
TOY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
       "moe.expert_hidden=16", "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=2"]
QUIET = ["train.progress=false", "logging.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
         "logging.every=1"]


class CheckFailed(Exception):
    """One line: what was wrong."""


@dataclass
class Ctx:
    out: str
    dry: bool
    log: Callable[[str], None]
    env: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def steps(self, gpu: int, dry: int) -> int:
        return dry if self.dry else gpu

    def sizes(self) -> list[str]:
        return TOY if self.dry else []

    def run(self, argv: list[str], name: str, timeout: float, nproc: int = 1) -> subprocess.CompletedProcess:
        """Run a command (under torchrun when nproc > 1), its output to <out>/<name>.log."""
        if nproc > 1:
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + argv[1:]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   MOETRAIN_DIST_TIMEOUT="300")
        if self.dry:
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        path = os.path.join(self.out, name + ".log")
        with open(path, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            try:
                proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                f.write((exc.stdout or "") if isinstance(exc.stdout, str) else "")
                raise CheckFailed(f"{name}: no result after {timeout:.0f} s (log: {path})") from None
            f.write(proc.stdout)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise CheckFailed(f"{name}: exit {proc.returncode}: {tail[0][:300]} (log: {path})")
        return proc

    def train(self, name: str, overrides: list[str], steps: int, nproc: int = 1, config: str = "configs/tiny_cpu.yaml",
              timeout: float = 300, logged: Optional[int] = None) -> dict:
        """Train to `steps` and return {'losses': [...], 'records': [...], 'stdout': str}; `logged`
        losses expected (default: every step)."""
        run_dir = os.path.join(self.out, "runs")
        argv = [sys.executable, "-m", "moetrain.train", "--config", config] + self.sizes() + QUIET + [
            f"train.steps={steps}", f"train.device={self.device}", f"logging.dir={run_dir}", f"logging.run_name={name}",
            f"checkpoint.dir={os.path.join(self.out, 'ckpt', name)}"] + overrides
        proc = self.run(argv, name, timeout, nproc)
        with open(os.path.join(run_dir, name, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        losses = [r["loss"] for r in records]
        want = steps if logged is None else logged
        if len(losses) != want or not all(isinstance(v, float) and math.isfinite(v) for v in losses):
            raise CheckFailed(f"{name}: expected {want} finite losses, got {losses[:5]}...")
        return {"losses": losses, "records": records, "stdout": proc.stdout}


# ----------------------------------------------------------------------------- steps

def step_env(ctx: Ctx) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dry_run": ctx.dry}
    try:
        from importlib.metadata import version
        info["deepspeed"] = version("deepspeed")
    except Exception:
        info["deepspeed"] = None
    if not ctx.dry:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(props.total_memory / 2 ** 30, 1), gpu_count=torch.cuda.device_count(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    ctx.env.update(info)
    return info


def step_pytest_gpu(ctx: Ctx) -> dict:
    proc = ctx.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                   "pytest_gpu", timeout=600)
    summary = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " skipped" in ln or " deselected" in ln]
    return {"summary": summary[-1] if summary else ""}


def _note(stdout: str, key: str) -> Optional[str]:
    for line in stdout.splitlines():
        if line.startswith("moetrain: world") and key in line:
            return line.split(key, 1)[1].split(";")[0].strip()
    return None


def step_impls(ctx: Ctx) -> dict:
    steps = ctx.steps(60, 4)
    out = {}
    for impl in ("grouped", "bmm", "loop"):
        r = ctx.train(f"impl_{impl}", [f"moe.grouped_mm={impl}"], steps)
        if not ctx.dry and not r["losses"][-1] < r["losses"][0]:
            raise CheckFailed(f"impl {impl}: loss did not fall over {steps} steps: {r['losses'][0]:.4f} -> "
                              f"{r['losses'][-1]:.4f}")
        out[impl] = {"first_loss": r["losses"][0], "final_loss": r["losses"][-1],
                     "tokens_per_s": r["records"][-1]["tokens_per_s"], "experts": _note(r["stdout"], "experts:")}
    finals = [v["final_loss"] for v in out.values()]
    spread = (max(finals) - min(finals)) / min(finals)
    out["final_loss_spread"] = spread
    if spread > 0.03:
        raise CheckFailed(f"the three expert implementations end {spread:.1%} apart (> 3%): {finals}")
    return out


def step_recipes(ctx: Ctx) -> dict:
    steps = ctx.steps(30, 2)
    out, failed = {}, []
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if not name.endswith(".yaml") or name in RECIPE_SKIP:
            continue
        with open(os.path.join(REPO, "configs", name)) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        # published shapes (mixtral_8x7b: 8 K/V heads) at the toy size's 2 heads: keep GQA, 1 K/V head
        extra = ["model.n_kv_heads=1"] if model.get("n_kv_heads") else []
        try:
            r = ctx.train(f"recipe_{name[:-5]}", extra, steps, config=f"configs/{name}")
            out[name] = {"final_loss": r["losses"][-1], "tokens_per_s": r["records"][-1]["tokens_per_s"]}
        except CheckFailed as exc:
            failed.append(str(exc))
    if failed:
        raise CheckFailed("; ".join(failed))
    return out


def step_deepspeed(ctx: Ctx) -> dict:
    steps = ctx.steps(30, 2)
    r = ctx.train("deepspeed", ["train.engine=deepspeed", "train.zero_stage=1"], steps, timeout=600)
    return {"final_loss": r["losses"][-1], "tokens_per_s": r["records"][-1]["tokens_per_s"]}


def step_checkpoint(ctx: Ctx) -> dict:
    total, every = ctx.steps(20, 4), ctx.steps(10, 2)
    det = ["train.deterministic=true", "moe.capacity_factor=null"]
    a = ctx.train("ckpt_full", det + [f"checkpoint.every={every}"], total)
    step_dir = os.path.join(ctx.out, "ckpt", "ckpt_full", f"step_{every:08d}")
    if not os.path.isdir(step_dir):
        raise CheckFailed(f"no checkpoint at {step_dir}")
    resumed = ctx.train("ckpt_resumed", det + [f"checkpoint.resume={step_dir}"], total, logged=total - every)["losses"]
    if resumed != a["losses"][every:]:
        diff = max(abs(x - y) for x, y in zip(resumed, a["losses"][every:]))
        raise CheckFailed(f"resumed losses differ from the uninterrupted run's (max |diff| {diff:.3g})")
    return {"steps": total, "resumed_from": every, "bitwise_equal": True}


def step_snapshot(ctx: Ctx) -> dict:
    """In-memory snapshots of CUDA state (DCP into host memory, files moved on the gloo side
    group): ep 2 on the one GPU over cuda:gloo, a snapshot every 2 steps and no disk checkpoints;
    the last snapshot removed, a second run with resume=auto recovers the one before and its last
    two losses equal the first run's bit for bit."""
    total = ctx.steps(8, 4)
    shm = os.path.join(ctx.out, "shm")
    common = ["train.deterministic=true", "moe.capacity_factor=null", "parallel.ep=2", "parallel.backend=gloo",
              "checkpoint.every=0", "checkpoint.snapshot_every=2", f"checkpoint.snapshot_dir={shm}",
              f"checkpoint.dir={os.path.join(ctx.out, 'ckpt', 'snapshot')}", "checkpoint.resume=auto"]
    a = ctx.train("snap_full", common, total, nproc=2)
    base = os.path.join(shm, f"uid{os.getuid()}")
    nodes = os.listdir(os.path.join(base, "snap_full"))
    if len(nodes) != 1:
        raise CheckFailed(f"expected one node's snapshots under {base}/snap_full, found {nodes}")
    mine = os.path.join(base, "snap_resumed", nodes[0])        # the second run's name, same node
    shutil.copytree(os.path.join(base, "snap_full", nodes[0]), mine)
    shutil.rmtree(os.path.join(mine, f"step_{total:08d}"))
    b = ctx.train("snap_resumed", common, total, nproc=2, logged=2)
    if "resumed from the in-memory snapshot" not in b["stdout"]:
        raise CheckFailed("the second run did not resume from the in-memory snapshot")
    if b["losses"] != a["losses"][-2:]:
        raise CheckFailed(f"losses after the snapshot {b['losses']} differ from the uninterrupted run's "
                          f"{a['losses'][-2:]}")
    snaps = sorted(r["snapshot_ms"] for r in a["records"] if "snapshot_ms" in r)
    return {"steps": total, "resumed_from": total - 2, "bitwise_equal": True,
            "snapshot_ms_median": snaps[len(snaps) // 2] if snaps else None,
            "snapshot_mb": max((r["snapshot_mb"] for r in a["records"] if "snapshot_mb" in r), default=None)}


LAYOUTS = [("ep2", 2, ["parallel.ep=2"]), ("ep4", 4, ["parallel.ep=4"]),
           ("tp2_ep2", 4, ["parallel.tp=2", "parallel.ep=2"]), ("fsdp2", 2, ["parallel.fsdp=true"]),
           # moe.placement=balanced: replicas, re-placements (weights + moments moved) every 2 steps
           # (over cuda:gloo like the rest of this step: ranks share the GPU; NCCL is not exercised)
           ("balanced_ep2", 2, ["parallel.ep=2", "moe.placement=balanced", "moe.redundant_experts=2",
                                "moe.rebalance_every=2"])]


def step_layouts(ctx: Ctx) -> dict:
    steps = ctx.steps(10, 3)
    same = ["train.precision=fp32", "train.deterministic=true", "moe.capacity_factor=null", "parallel.backend=gloo"]
    ref = ctx.train("layout_world1", same, steps)["losses"]
    rtol = 2e-5 if ctx.dry else 1e-4
    out, failed = {"world1": ref}, []
    for name, nproc, extra in LAYOUTS:
        try:
            got = ctx.train(f"layout_{name}", same + extra, steps, nproc=nproc, timeout=600)["losses"]
        except CheckFailed as exc:
            failed.append(str(exc))
            continue
        worst = max(abs(g - r) / abs(r) for g, r in zip(got, ref))
        out[name] = {"losses": got, "max_rel_diff": worst}
        if worst > rtol:
            failed.append(f"{name}: loss curve differs from world 1 by {worst:.2e} (> {rtol:g})")
    if failed:
        raise CheckFailed("; ".join(failed))
    return out


def step_bench(ctx: Ctx) -> dict:
    path = os.path.join(ctx.out, "bench_moe.jsonl")
    if os.path.exists(path):
        os.remove(path)
    base = [sys.executable, "tools/bench_moe.py", "--device", ctx.device, "--json", path]
    if ctx.dry:
        base += ["--tokens", "64", "--dim", "16", "--hidden", "32", "--warmup", "0", "--iters", "1", "--threads", "1",
                 "--experts", "4,8", "--impl", "grouped,bmm,loop"]
    tables = []
    for extra in ([], ["--k", "8", "--experts", "8" if ctx.dry else "128"]):
        proc = ctx.run(base + extra, "bench" if not extra else "bench_k8", timeout=900)
        tables.append("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("{")))
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keep = ("system", "impl", "experts", "k", "ms", "tflops", "ratio_to_dense", "drop_frac")
    return {"table": tables, "records": [{k: r.get(k) for k in keep} for r in records]}


def _count_syncs(ctx: Ctx, name: str, overrides: list[str], nproc: int, max_per_layer: float) -> dict:
    argv = [sys.executable, "tools/count_syncs.py", "--config", "configs/tiny_cpu.yaml",
            "--max-per-layer", str(max_per_layer)] + ctx.sizes() + [f"train.device={ctx.device}"] + overrides
    proc = ctx.run(argv, name, timeout=300, nproc=nproc)
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def step_syncs(ctx: Ctx) -> dict:
    import torch

    from moetrain.moe.experts import choose_impl
    if ctx.dry:
        impl, world1 = "grouped", ["moe.grouped_mm=grouped"]
    else:
        impl = choose_impl("auto", torch.device("cuda", 0), torch.bfloat16, 128, 192)[0]
        world1 = []
    out = {"world1": _count_syncs(ctx, "syncs_world1", world1, 1, 0 if impl == "grouped" else 1),
           "ep2": _count_syncs(ctx, "syncs_ep2", ["parallel.ep=2", "parallel.backend=gloo"], 2, 1),
           # balanced placement adds no per-step host read (slot tables and the norm's slots stay on the device)
           "ep2_balanced": _count_syncs(ctx, "syncs_ep2_balanced", ["parallel.ep=2", "parallel.backend=gloo",
                                                                    "moe.placement=balanced", "moe.redundant_experts=2",
                                                                    "moe.rebalance_every=1000"], 2, 1)}
    out["expert_impl"] = impl
    return out


STEPS = {"env": step_env, "pytest_gpu": step_pytest_gpu, "impls": step_impls, "recipes": step_recipes,
         "deepspeed": step_deepspeed, "checkpoint": step_checkpoint, "snapshot": step_snapshot, "layouts": step_layouts,
         "bench": step_bench,
         "syncs": step_syncs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what CI runs)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "gpu_check"))
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEPS)}")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        print(f"gpu_check: unknown step(s) {','.join(unknown)}: choose from {','.join(STEPS)}", file=sys.stderr)
        return 2
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to this torch "
              f"({torch.__version__}): run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ctx = Ctx(out, args.dry_run, lambda m: print(m, flush=True))
    results, t_all = [], time.perf_counter()
    names = only or list(STEPS)
    if "env" not in names:
        names = ["env"] + names
    for name in names:
        t0 = time.perf_counter()
        rec = {"name": name}
        try:
            rec["details"] = STEPS[name](ctx)
            rec["ok"] = True
        except CheckFailed as exc:
            rec.update(ok=False, error=str(exc))
        except Exception as exc:      # a bug in a step is a failed step, not a lost summary
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(rec)
        ctx.log(f"gpu_check: {name:<11} {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']:.0f} s)"
                + ("" if rec["ok"] else f": {rec['error']}"))
    summary = {"ok": all(r["ok"] for r in results), "dry_run": args.dry_run, "seconds": round(time.perf_counter() - t_all, 1),
               "machine": ctx.env, "steps": results, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    ctx.log(f"gpu_check: {'all passed' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s; summary {path}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
