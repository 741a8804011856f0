#!/usr/bin/env python
"""Train every routing recipe in configs/ on the same token budget and compare them.

    python tools/compare_routers.py --steps 300 --out bench_out/routers [--nproc 2] [recipes ...]
    python tools/compare_routers.py --steps 600 --jobs 2 --set train.num_threads=1   # 2 at a time

Each recipe runs `python -m moetrain.train --config configs/<recipe>.yaml` (under torchrun with
`parallel.ep=<nproc>` when --nproc > 1) with the same steps, batch and seed; the tool reads each
run's metrics.jsonl and prints a markdown table (final val loss, mean drop rate, mean load CV
over layers, tokens/s) plus one JSON line per recipe, and writes `val_loss.png`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)           # moetrain from this checkout, installed or not
DEFAULT_RECIPES = ["tiny_cpu", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free",
                   "deepseek", "moepp", "reroute", "peer"]


def run_recipe(recipe: str, args) -> list[dict]:
    cfg = os.path.join(ROOT, "configs", f"{recipe}.yaml")
    overrides = [f"train.steps={args.steps}", f"logging.dir={args.out}", f"logging.run_name={recipe}",
                 "train.progress=false", "logging.tensorboard=false", f"logging.every={args.log_every}",
                 f"train.eval_every={args.eval_every}"] + args.set
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "moetrain.train", "--config", cfg, f"parallel.ep={args.nproc}"] + overrides
    else:
        cmd = [sys.executable, "-m", "moetrain.train", "--config", cfg] + overrides
    print(f"== {recipe}: {' '.join(cmd[-len(overrides) - 3:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"recipe {recipe} failed with exit code {proc.returncode}")
    with open(os.path.join(args.out, recipe, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished_run(recipe: str, args) -> list[dict] | None:
    """With --reuse: the records of an earlier run of `recipe` in --out that reached --steps with
    a final val loss and was started with the same --set overrides; else None (run it)."""
    run_dir = os.path.join(args.out, recipe)
    if not args.reuse or not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    done = any(r.get("step") == args.steps and "val_loss" in r for r in recs)
    from moetrain.config import load_config
    try:
        cfg = load_config(os.path.join(run_dir, "config.yaml"), [])
        same = load_config(os.path.join(ROOT, "configs", f"{recipe}.yaml"), args.set + [
            f"train.steps={args.steps}", f"logging.dir={args.out}", f"logging.run_name={recipe}"])
    except Exception:          # unreadable or from an older schema: run again
        return None
    keys = ("model", "moe", "train.steps", "train.seed", "train.lr", "train.global_batch_size", "train.seq_len")
    if not done or any(_get(cfg, k) != _get(same, k) for k in keys):
        return None
    print(f"== {recipe}: reusing {run_dir} ({args.steps} steps)", flush=True)
    return recs


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def summarize(recipe: str, recs: list[dict]) -> dict:
    train = [r for r in recs if "loss" in r]
    vals = [r for r in recs if r.get("val_loss") is not None]
    cvs = [sum(v for k, v in r.items() if k.endswith(".load_cv")) /
           max(1, sum(1 for k in r if k.endswith(".load_cv"))) for r in train[1:]]
    speed = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    return {"recipe": recipe, "val_loss": vals[-1]["val_loss"] if vals else None,
            "train_loss": train[-1]["loss"], "drop_frac": sum(r["drop_frac"] for r in train) / len(train),
            "load_cv": sum(cvs) / max(1, len(cvs)), "tokens_per_s": sorted(speed)[len(speed) // 2],
            "curve": [(0, r["init_val_loss"]) for r in recs if r.get("init_val_loss") is not None][:1]
            + [(r["step"], r["val_loss"]) for r in vals]}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors          # distinct colours for up to 20 recipes
    styles = ("-", "--", ":")
    for i, r in enumerate(results):
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, losses, marker="o", ms=3, color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                ls=styles[(i // 10) % 3], label=r["recipe"])
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/byte)")
    ax.set_title("Routing recipes, same token budget")
    finals = [c[-1][1] for c in (r["curve"] for r in results) if c]
    ax.set_ylim(bottom=min(finals) - 0.05 if finals else None, top=min(3.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("recipes", nargs="*", default=DEFAULT_RECIPES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "routers"))
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every recipe")
    ap.add_argument("--jobs", type=int, default=1,
                    help="recipes trained at the same time (give each fewer threads: --set train.num_threads=1)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a recipe's existing run in --out when it already reached --steps with the same "
                         "overrides (add recipes to a table without rerunning the others)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.jobs < 1:
        ap.error(f"--jobs={args.jobs} must be >= 1")

    def one(recipe):
        return summarize(recipe, finished_run(recipe, args) or run_recipe(recipe, args))
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, args.recipes))
    print("\n| recipe | val loss | train loss | drop frac | load CV | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {r['drop_frac']:.3f} | "
              f"{r['load_cv']:.3f} | {r['tokens_per_s']:.0f} |")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}))
    png = os.path.join(args.out, "val_loss.png")
    plot(results, png)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
