"""Checkpoint save/load timings at world 1, sync vs async (not a test; run by hand):

    python tests/checkpoint/bench_checkpoint.py tiny
    python tests/checkpoint/bench_checkpoint.py 100m [--dir /tmp/ckbench]

Reports the size on disk, sync save time (write + fsync + commit), async save time blocking the
training loop (CPU staging copy) and until committed, and resume time (verify + read)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from moetrain.checkpoint import Checkpointer  # noqa: E402
from moetrain.config import load_config, validate_layout  # noqa: E402
from moetrain.data import load_token_data  # noqa: E402
from moetrain.model.transformer import count_params  # noqa: E402
from moetrain.parallel.mesh import LaunchEnv, init_parallel  # noqa: E402
from moetrain.train.loop import build_trainer  # noqa: E402

CONFIGS = {
    "tiny": [],     # configs/tiny_cpu.yaml as shipped
    "100m": ["model.dim=768", "model.n_layers=8", "model.n_heads=12", "model.ffn_hidden=1024",
             "moe.num_experts=8", "moe.top_k=2"],
}
SMALL_BATCH = ["train.seq_len=16", "train.global_batch_size=1", "train.micro_batch_size=1", "train.steps=10",
               "train.eval_every=0", "train.progress=false"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", choices=sorted(CONFIGS))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="ckbench-")
    cfg_over = CONFIGS[args.config] + SMALL_BATCH
    data = None
    results = {}
    for mode in ("sync", "async"):
        for rep in range(args.repeat):
            ck = os.path.join(root, f"{mode}{rep}")
            shutil.rmtree(ck, ignore_errors=True)
            cfg = load_config(os.path.join(REPO, "configs/tiny_cpu.yaml"), cfg_over + [
                f"checkpoint.dir={ck}", "checkpoint.every=1", f"checkpoint.async_save={mode == 'async'}"])
            dp, tp, ep = validate_layout(cfg, 1)
            par = init_parallel(dp, tp, ep, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
            data = data or load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
            trainer = build_trainer(cfg, par, data)
            trainer.train_step(0)                     # optimizer state exists, as in a real save
            if rep == 0 and mode == "sync":
                total, _ = count_params(trainer.model, cfg)
                print(f"{args.config}: {total / 1e6:.1f}M params")
            ckpt = Checkpointer(cfg, par, log=lambda m: None)
            t0 = time.perf_counter()
            ckpt.save(trainer)
            blocking = time.perf_counter() - t0
            ckpt.wait()
            done = time.perf_counter() - t0
            size = sum(os.path.getsize(os.path.join(dp_, f)) for dp_, _, fs in os.walk(ck) for f in fs)
            del trainer, ckpt
            cfg2 = load_config(os.path.join(REPO, "configs/tiny_cpu.yaml"), cfg_over + [
                f"checkpoint.dir={ck}", "checkpoint.resume=auto"])
            fresh = build_trainer(cfg2, par, data)
            t1 = time.perf_counter()
            Checkpointer(cfg2, par, log=lambda m: None).resume(fresh)
            load = time.perf_counter() - t1
            assert fresh.state.step == 1
            del fresh
            results.setdefault(mode, []).append((blocking, done, load, size))
            shutil.rmtree(ck, ignore_errors=True)
    for mode, rows in results.items():
        best = [min(r[i] for r in rows) for i in range(3)]
        print(f"  {mode:5s}: size {rows[0][3] / 2**20:8.1f} MiB  save blocks {best[0]:6.2f}s  "
              f"committed after {best[1]:6.2f}s  resume {best[2]:6.2f}s   (best of {len(rows)})")


if __name__ == "__main__":
    main()
