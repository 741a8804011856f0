#!/usr/bin/env python
"""Parameter + gradient + optimizer-state bytes per rank, measured from the live tensors of a
real trainer, for every layout dp in {1,2,4} x tp in {1,2} x ep in {1,2,4} (ep | dp, world <= 8)
with plain data parallelism, FSDP2 (parallel.fsdp, dp > 1) and ZeRO-1/2 (train.engine=deepspeed,
tp = 1), on CPU gloo ranks spawned here.

    python tools/bench_memory.py                       # the mid-size config below, all layouts
    python tools/bench_memory.py --worlds 1,2 --modes native,fsdp --json mem.jsonl
    python tools/bench_memory.py --quick               # a tiny model (for tests)

Model (default): dim 256, 4 layers, 4 heads, 16 experts top-2 in every layer (expert hidden
256), vocab 256: ~14M parameters, ~13M of them in experts. fp32 everywhere (CPU).

Measurement: every configuration builds the trainer (moetrain.train.loop.build_trainer), runs
one full step, then the forward/backward of a second step (gradients reduced: this is when a
rank holds the most gradient memory), records the gradient bytes, runs the optimizer step and
records parameter and optimizer-state bytes. Bytes are the sizes of the distinct storages
behind the tensors (a view counts its whole storage once; padding FSDP or ZeRO add is counted):
  params  native/fsdp: the module's parameters (FSDP: each DTensor's local shard).
          deepspeed: the module's parameters (ZeRO keeps them whole and flattened) plus the
          fp32 partitions its optimizer updates (a copy, also for fp32 training).
  grads   native/fsdp: p.grad (FSDP: the reduce-scattered local shard) once backward and the
          gradient reduction of the step are done.
          deepspeed: p.grad of module params and of the fp32 partitions, and ZeRO's gradient
          buffers (averaged_gradients, grads_in_partition, reduction buckets): the largest total
          after any micro batch's backward (ZeRO-1 accumulates whole gradients until the last).
  optim   the optimizer's state tensors (AdamW exp_avg and exp_avg_sq; the scalar step counts).
Each row reports the max over ranks (ranks differ by little: same dense shards, same number of
experts); `ranks` in the JSON has every rank's numbers.

Output: a markdown table on stdout, and one JSON object per configuration on its own line (also
appended to --json FILE): keys mode, world, dp, tp, ep, params_mib, grads_mib, optim_mib,
total_mib (max over ranks of each), ranks ([{params, grads, optim} bytes per rank]), model
(parameter count of the full model), seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.util import find_spec

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed picks its accelerator at import

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.ffn_hidden=512", "model.max_seq_len=64",
         "train.seq_len=64", "moe.num_experts=16", "moe.top_k=2", "moe.every=1", "moe.capacity_factor=null"]
QUICK = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=16",
         "train.seq_len=16", "moe.num_experts=4", "moe.top_k=2", "moe.every=1", "moe.capacity_factor=null"]
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=1", "train.steps=2", "train.warmup_steps=1",
         "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "logging.tensorboard=false",
         "checkpoint.every=0"]
MODES = ("native", "fsdp", "zero1", "zero2")
MIB = 2 ** 20


def layouts(worlds) -> list[tuple[int, int, int]]:
    """(dp, tp, ep) with dp in {1,2,4}, tp in {1,2}, ep in {1,2,4}, ep | dp, dp*tp in worlds."""
    out = []
    for dp in (1, 2, 4):
        for tp in (1, 2):
            for ep in (1, 2, 4):
                if dp % ep == 0 and dp * tp in worlds:
                    out.append((dp, tp, ep))
    return out


def mode_applies(mode: str, dp: int, tp: int) -> bool:
    if mode == "fsdp":
        return dp > 1                      # nothing to shard at dp 1 (apply_fsdp is a no-op)
    if mode in ("zero1", "zero2"):
        return tp == 1 and find_spec("deepspeed") is not None
    return True


def overrides(mode: str, dp: int, tp: int, ep: int, quick: bool, log_dir: str) -> list[str]:
    extra = [f"parallel.tp={tp}", f"parallel.ep={ep}", f"logging.dir={log_dir}"]
    if mode == "fsdp":
        extra.append("parallel.fsdp=true")
    elif mode.startswith("zero"):
        extra += ["train.engine=deepspeed", f"train.zero_stage={mode[-1]}"]
    return (QUICK if quick else MODEL) + TRAIN + extra


# --------------------------------------------------------------------------- measuring

def _storages(tensors) -> dict[int, int]:
    """{storage pointer: bytes} of the distinct storages behind tensors (DTensors: local shard)."""
    from torch.distributed.tensor import DTensor
    out: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        st = t.untyped_storage()
        if st.nbytes():
            out[st.data_ptr()] = st.nbytes()
    return out


def _flat_tensors(obj, depth: int = 3) -> list:
    import torch
    if torch.is_tensor(obj):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_tensors(v, depth - 1)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_tensors(v, depth - 1)]
    return []


def grad_storages(trainer) -> dict[int, int]:
    tensors = [p.grad for p in trainer.model.parameters()]
    if trainer.engine is not None:
        zopt = trainer.opt
        # ZeRO's gradient buffers: the reduced partitions, stage 2's contiguous partition
        # buffer, and the reduction buckets gradients are copied into during backward
        tensors += _flat_tensors(getattr(zopt, "averaged_gradients", None))
        tensors += _flat_tensors(getattr(zopt, "grads_in_partition", None))
        tensors += [t for b in (getattr(zopt, "ipg_buckets", None) or {}).values()
                    for t in _flat_tensors(getattr(b, "buffer", None))]
        inner = getattr(zopt, "optimizer", zopt)
        tensors += [p.grad for g in inner.param_groups for p in g["params"]]
    return _storages(tensors)


def param_storages(trainer) -> dict[int, int]:
    tensors = [p for p in trainer.model.parameters()]
    if trainer.engine is not None:
        inner = getattr(trainer.opt, "optimizer", trainer.opt)
        tensors += [p for g in inner.param_groups for p in g["params"]]     # ZeRO's fp32 partitions
    return _storages(tensors)


def optim_storages(trainer) -> dict[int, int]:
    inner = getattr(trainer.opt, "optimizer", trainer.opt) if trainer.engine is not None else trainer.opt
    return _storages(_flat_tensors(list(inner.state.values())))


def measure(trainer) -> dict[str, int]:
    """One full step, then the next step's gradients (measured), its update, and the rest."""
    from moetrain.parallel.grads import clip_grad_norm
    trainer.train_step(0)
    peak: dict[int, int] = {}
    if trainer.engine is not None:
        # ZeRO-1 holds whole unreduced gradients between micro batches, ZeRO-2 reduces each into
        # its partition: keep the largest set seen after any micro batch's backward
        backward = trainer.engine.backward

        def backward_and_measure(loss):
            backward(loss)
            now = grad_storages(trainer)
            if sum(now.values()) > sum(peak.values()):
                peak.clear()
                peak.update(now)

        trainer.engine.backward = backward_and_measure
    trainer.compute_gradients(1)
    grads = grad_storages(trainer)
    if sum(peak.values()) > sum(grads.values()):
        grads = peak
    if trainer.engine is not None:
        trainer.engine.step()
    else:
        t, par = trainer.cfg.train, trainer.par
        clip_grad_norm(trainer.dense_params, trainer.expert_params, t.grad_clip, par.ep_group, par.dims.ep)
        trainer.opt.step()
    params, optim = param_storages(trainer), optim_storages(trainer)
    # a storage counted as a parameter is not also counted as a gradient or optimizer state
    grads = {k: v for k, v in grads.items() if k not in params}
    optim = {k: v for k, v in optim.items() if k not in params and k not in grads}
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optim": sum(optim.values())}


# --------------------------------------------------------------------------- ranks

def rank_main(args, rank, world):
    """args: (configs, quick, log_dir, out_path). Rank 0 writes the rows to out_path as JSON."""
    configs, quick, log_dir, out_path = args
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from moetrain.config import load_config, validate_layout
    from moetrain.data import load_token_data
    from moetrain.model.transformer import count_params
    from moetrain.parallel.mesh import LaunchEnv, init_parallel, shutdown
    from moetrain.train.loop import build_trainer

    rows = []
    data = None
    for mode, dp, tp, ep in configs:
        cfg = load_config(None, overrides(mode, dp, tp, ep, quick, log_dir))
        validate_layout(cfg, world)
        env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
        par = init_parallel(dp, tp, ep, env, "cpu")
        data = data or load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
        started = time.perf_counter()
        trainer = build_trainer(cfg, par, data)
        total_params = count_params(trainer.model, cfg)[0]
        mine = measure(trainer)
        seconds = time.perf_counter() - started
        every = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * world
            dist.all_gather_object(every, mine)
        del trainer
        rows.append({"mode": mode, "world": world, "dp": dp, "tp": tp, "ep": ep,
                     **{f"{k}_mib": round(max(r[k] for r in every) / MIB, 2) for k in ("params", "grads", "optim")},
                     "total_mib": round(max(sum(r.values()) for r in every) / MIB, 2),
                     "ranks": every, "model": total_params, "seconds": round(seconds, 2)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    shutdown()      # (world 1 with the deepspeed engine has a process group too)


def run_world(world: int, configs: list, quick: bool, log_dir: str) -> list[dict]:
    from tools._local_ranks import run_local_ranks
    out_path = os.path.join(log_dir, f"rows_world{world}.json")
    run_local_ranks(rank_main, (configs, quick, log_dir, out_path), world)
    with open(out_path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- output

def table(rows: list[dict]) -> str:
    lines = ["| dp | tp | ep | mode | params MiB | grads MiB | optim MiB | total MiB | vs native |",
             "|---:|---:|---:|:-----|----------:|---------:|---------:|---------:|---------:|"]
    native = {(r["dp"], r["tp"], r["ep"]): r["total_mib"] for r in rows if r["mode"] == "native"}
    for r in sorted(rows, key=lambda r: (r["tp"], r["dp"], r["ep"], MODES.index(r["mode"]))):
        base = native.get((r["dp"], r["tp"], r["ep"]))
        ratio = f"{r['total_mib'] / base:.2f}x" if base else ""
        lines.append(f"| {r['dp']} | {r['tp']} | {r['ep']} | {r['mode']} | {r['params_mib']:.1f} | "
                     f"{r['grads_mib']:.1f} | {r['optim_mib']:.1f} | {r['total_mib']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4,8", help="world sizes to run (comma list)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--quick", action="store_true", help="a tiny model instead of the mid-size one")
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--log-dir", default=None, help="where the runs write metrics (default: a temp dir)")
    args = ap.parse_args(argv)
    worlds = sorted({int(w) for w in args.worlds.split(",") if w})
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    if any(m.startswith("zero") for m in modes) and find_spec("deepspeed") is None:
        print("bench_memory: deepspeed is not installed: skipping zero1/zero2", file=sys.stderr)
    import tempfile
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_memory_")
    rows = []
    for world in worlds:
        configs = [(m, dp, tp, ep) for dp, tp, ep in layouts({world}) for m in modes if mode_applies(m, dp, tp)]
        if not configs:
            continue
        started = time.perf_counter()
        got = run_world(world, configs, args.quick, log_dir)
        print(f"bench_memory: world {world}: {len(got)} configurations in {time.perf_counter() - started:.0f}s",
              file=sys.stderr, flush=True)
        for r in got:
            line = json.dumps(r)
            print(line, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(line + "\n")
        rows += got
    if rows:
        print(f"\nper rank, max over ranks; model {rows[0]['model'] / 1e6:.2f}M parameters, fp32\n")
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
