#!/usr/bin/env python
"""Depth up-scaling (SOLAR): an n-layer checkpoint -> a 2(n-m)-layer one to continue training.

    python tools/depth_upscale.py CKPT --drop M --out CKPT_DIR [--keep-step] [group.key=value ...]

The new model is layers 0..n-m-1 of CKPT followed by a copy of layers m..n-1 (new layer n-m+j is
old layer m+j); embeddings, final norm and head are copied. Dense and MoE layers alike (experts
keep their global ids). The target config is CKPT's own with model.n_layers = 2(n-m) (plus the
overrides, which may not change the model's shape otherwise). With moe.every > 1 every copied
layer must land on a position of the same kind: n - 2m must be a multiple of moe.every.

Writes CKPT_DIR/step_<0, or CKPT's step with --keep-step>/ (model only: fresh optimizer and RNG
streams) and CKPT_DIR/upscaled.yaml (checkpoint.dir=CKPT_DIR, checkpoint.resume=auto,
logging.run_name=<run>-upscaled unless overridden). Continue training at any layout with
    python -m moetrain.train --config CKPT_DIR/upscaled.yaml [...]

Exit codes: 0 ok, 1 the checkpoint is damaged or unreadable, 2 bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]

from upcycle import check_out_dir, write_checkpoint  # noqa: E402

from moetrain import growth  # noqa: E402
from moetrain.checkpoint.convert import read_checkpoint, run_tool  # noqa: E402
from moetrain.config import ConfigError  # noqa: E402

PROG = "depth_upscale"


def upscale(args) -> str:
    check_out_dir(args.out)
    info, full = read_checkpoint(args.ckpt)
    src_cfg = growth.config_from_dict(full["manifest"].get("config"))
    n = src_cfg.model.n_layers
    sources = growth.depth_plan(n, args.drop)
    want = len(sources)
    layer_override = [o for o in args.overrides if o.split("=", 1)[0] == "model.n_layers"]
    if layer_override and layer_override[-1].split("=", 1)[1].strip() != str(want):
        raise growth.GrowthError(f"{layer_override[-1]} contradicts --drop {args.drop}: the up-scaled model has "
                                 f"2*({n}-{args.drop}) = {want} layers")
    dst_cfg = growth.config_from_dict(full["manifest"]["config"], [f"model.n_layers={want}"] + args.overrides)
    for key in ("vocab_size", "dim", "n_heads", "kv_heads", "ffn_hidden", "tie_embeddings"):
        if getattr(src_cfg.model, key) != getattr(dst_cfg.model, key):
            raise growth.GrowthError(f"model.{key} may not change when up-scaling depth "
                                     f"({getattr(src_cfg.model, key)!r} in the checkpoint)")
    growth.check_depth_moe_pattern(src_cfg, dst_cfg, sources)
    state = growth.depth_upscale_state_dict(full["model"], sources)
    fresh = growth.fresh_state(dst_cfg)          # shape/key check against the deeper model
    missing = sorted(set(fresh) - set(state))
    extra = sorted(set(state) - set(fresh))
    if missing or extra:
        raise growth.GrowthError("the up-scaled state does not fit the target config: "
                                 + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"))
    for k, t in fresh.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise growth.GrowthError(f"tensor {k} has shape {list(state[k].shape)}, the target config wants "
                                     f"{list(t.shape)}: overrides may not change the model's shape")
    step = info.step if args.keep_step else 0
    tokens = int(full["train"].get("tokens_seen", 0)) if args.keep_step else 0
    record = growth.checkpoint_record(dst_cfg, state, step, tokens,
                                      depth_upscaled_from={"path": os.path.abspath(info.path), "step": info.step,
                                                           "n_layers": n, "drop": args.drop, "sources": sources})
    path = write_checkpoint(record, args.out, info.path, dst_cfg, "upscaled.yaml", args.overrides, "-upscaled")
    print(f"{PROG}: wrote {path}: {want} layers = old {sources[:n - args.drop]} + old {sources[n - args.drop:]}, "
          f"step {step}, fresh optimizer")
    print(f"{PROG}: train it with: python -m moetrain.train --config {os.path.join(args.out, 'upscaled.yaml')}")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="step_NNNNNNNN directory or checkpoint.dir")
    ap.add_argument("--drop", "-m", type=int, required=True, help="m: layers dropped from each copy (0 <= m < n)")
    ap.add_argument("--out", required=True, help="checkpoint.dir to write into (new or empty)")
    ap.add_argument("--keep-step", action="store_true", help="keep the source step and tokens_seen (default: step 0)")
    ap.add_argument("overrides", nargs="*", help="target config overrides (not the model shape)")
    args = ap.parse_intermixed_args(argv)
    return run_tool(PROG, lambda: upscale(args), (ConfigError, growth.GrowthError))


if __name__ == "__main__":
    raise SystemExit(main())
