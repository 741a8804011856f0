#!/usr/bin/env python
"""Host syncs of one training step: how often the host waits for the device (moetrain/syncs.py).

    python tools/count_syncs.py --config configs/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 2 tools/count_syncs.py --config configs/tiny_cpu.yaml parallel.ep=2 \
        parallel.backend=gloo train.device=cuda         # two ranks sharing one GPU

Builds the trainer as training does, runs one step's forward and backward (all micro-steps and
the gradient sync) to warm up, then counts the sync-forcing ops of the next one (SyncCounter), plus
on CUDA the synchronizing calls CUDA's own detector reports (torch.cuda.set_sync_debug_mode;
with the gloo backend these include gloo's host copies of CUDA tensors). The optimizer step is
not counted: its one sync (the gradient norm, which decides whether the step is taken) is per
step, not per layer.

Prints one JSON line on rank 0: world, device, moe_layers, micro_steps, by_op (summed over ranks),
per_layer_micro_step (max over ranks), cuda_sync_warnings. --max-per-layer N exits 1 when a rank
needs more than N syncs per MoE layer and micro-step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def count_step(trainer) -> dict:
    """Counts for one step of `trainer` (after a warm-up step)."""
    import torch

    from moetrain.syncs import SyncCounter
    trainer.compute_gradients(step=0)
    cuda = trainer.par.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(trainer.par.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with SyncCounter() as counter:
                trainer.compute_gradients(step=1)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    cuda_syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
    t = trainer.cfg.train
    micro_steps = t.global_batch_size // trainer.par.dims.dp // trainer.micro
    layers = len(trainer.model.moe_layers())
    return {"by_op": dict(counter.by_op), "total": counter.total, "moe_layers": layers, "micro_steps": micro_steps,
            "per_layer_micro_step": counter.total / max(1, layers * micro_steps),
            "cuda_sync_warnings": cuda_syncs if cuda else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--max-per-layer", type=float, default=None,
                    help="exit 1 if a rank needs more syncs per MoE layer and micro-step")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from moetrain.config import load_config, validate_layout
    from moetrain.cpu_runtime import configure_cpu_process
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel, read_launch_env, shutdown
    from moetrain.precision import configure_determinism
    from moetrain.train.loop import build_trainer

    env = read_launch_env()
    cfg = load_config(args.config, args.overrides)
    dp, tp, ep = validate_layout(cfg, env.world_size)
    configure_cpu_process(cfg.train.num_threads, env.local_world_size, env.launcher)
    configure_determinism(cfg.train.deterministic)
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size, cfg.data.cache_dir)
    par = init_parallel(dp, tp, ep, env, cfg.train.device, backend=cfg.parallel.backend)
    try:
        result = count_step(build_trainer(cfg, par, data))
        rows = [result]
        if par.world > 1:
            rows = [None] * par.world
            dist.all_gather_object(rows, result, group=par.world_group)
    finally:
        shutdown()
    by_op: dict = {}
    for r in rows:
        for k, v in r["by_op"].items():
            by_op[k] = by_op.get(k, 0) + v
    worst = max(r["per_layer_micro_step"] for r in rows)
    warn = [r["cuda_sync_warnings"] for r in rows]
    if par.is_main:
        print(json.dumps({"world": par.world, "device": str(par.device), "moe_layers": rows[0]["moe_layers"],
                          "micro_steps": rows[0]["micro_steps"], "by_op": by_op, "per_layer_micro_step": worst,
                          "cuda_sync_warnings": None if warn[0] is None else max(warn)}), flush=True)
    if args.max_per_layer is not None and worst > args.max_per_layer:
        print(f"count_syncs: {worst:g} host syncs per MoE layer and micro-step > --max-per-layer "
              f"{args.max_per_layer:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
