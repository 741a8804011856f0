#!/usr/bin/env python
"""Sparse upcycling: a dense moetrain checkpoint -> an MoE checkpoint whose step 0 reproduces it.

    python tools/upcycle.py DENSE_CKPT --out CKPT_DIR [--config YAML] [--noise 0.01]
                            [--router auto|grouped|zero] [--keep-step] [--seed N] [group.key=value ...]

DENSE_CKPT: a step_NNNNNNNN directory or a checkpoint.dir (its newest complete checkpoint) of a
run with moe.num_experts=0. The target config is --config (default: the dense run's own config
from its manifest) plus the overrides, e.g. `moe.num_experts=8 moe.top_k=2 moe.capacity_factor=null`.
Each MoE layer's experts are copies (moe.expert_hidden = model.ffn_hidden) or slices (smaller
experts, e.g. the default ffn_hidden // top_k, or moe.expert_granularity > 1) of that layer's
dense FFN; the router is initialized so that the first forward pass equals the dense model's
(the algebra, and when it is exact: moetrain/growth.py). Everything else is copied.

Writes CKPT_DIR/step_<0 or the dense step with --keep-step>/ (model only: the optimizer and the
RNG streams start fresh) plus CKPT_DIR/upcycled.yaml: the target config with checkpoint.dir=
CKPT_DIR, checkpoint.resume=auto and logging.run_name=<dense run name>-upcycled (unless given as
overrides). Train from it, at any layout:
    python -m moetrain.train --config CKPT_DIR/upcycled.yaml [parallel.ep=2 ...]
(or with any config of the same model/moe shape plus checkpoint.resume=CKPT_DIR).

Exit codes: 0 ok, 1 the dense checkpoint is damaged or unreadable, 2 bad arguments or a target
config that cannot be upcycled (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]


from moetrain import growth  # noqa: E402
from moetrain.checkpoint import store  # noqa: E402
from moetrain.checkpoint.convert import read_checkpoint, run_tool, write_sharded  # noqa: E402
from moetrain.config import ConfigError, has_dense_layers, load_config, replace_keys, to_yaml  # noqa: E402

PROG = "upcycle"


def check_out_dir(out: str) -> None:
    if store.list_step_dirs(out):
        raise growth.GrowthError(f"--out {out} already holds checkpoints: choose an empty or new directory")


def write_checkpoint(full: dict, out: str, source: str, cfg, name: str, overrides=(), suffix: str = "") -> str:
    """Commit a consolidated dict as a sharded checkpoint and save the target config next to it
    as `name`, set up to continue in `out`: checkpoint.dir=out and checkpoint.resume=auto, and
    logging.run_name + suffix (so the new run never appends to the source run's metrics),
    unless the overrides set those keys."""
    os.makedirs(out, exist_ok=True)
    path = write_sharded(full, out, source)
    given = {o.split("=", 1)[0] for o in overrides}
    changes = {"checkpoint.dir": out, "checkpoint.resume": "auto"}
    if suffix:
        changes["logging.run_name"] = cfg.logging.run_name + suffix
    run_cfg = replace_keys(cfg, {k: v for k, v in changes.items() if k not in given})
    with open(os.path.join(out, name), "w") as f:
        f.write(to_yaml(run_cfg))
    return path


def upcycle(args) -> str:
    check_out_dir(args.out)
    info, full = read_checkpoint(args.dense)
    dense_cfg = growth.config_from_dict(full["manifest"].get("config"))
    if dense_cfg.moe.num_experts > 0 and not has_dense_layers(dense_cfg):
        raise growth.GrowthError(f"{info.path} is not a dense checkpoint (moe.num_experts="
                                 f"{dense_cfg.moe.num_experts}, every layer already MoE)")
    if args.config:
        moe_cfg = load_config(args.config, args.overrides)
    else:
        moe_cfg = growth.config_from_dict(full["manifest"]["config"], args.overrides)
    plan = growth.plan_upcycle(dense_cfg, moe_cfg, args.noise, args.router, args.seed)
    for note in plan.notes:
        print(f"{PROG}: {note}")
    state = growth.upcycle_state_dict(full["model"], dense_cfg, moe_cfg, plan)
    step = info.step if args.keep_step else 0
    tokens = int(full["train"].get("tokens_seen", 0)) if args.keep_step else 0
    record = growth.checkpoint_record(
        moe_cfg, state, step, tokens,
        upcycled_from={"path": os.path.abspath(info.path), "step": info.step, "router": plan.router,
                       "slices": plan.slices, "w2_scale": plan.w2_scale, "noise": plan.noise,
                       "exact": plan.exact})
    path = write_checkpoint(record, args.out, info.path, moe_cfg, "upcycled.yaml", args.overrides, "-upcycled")
    n_moe = sum(growth.is_moe_layer(moe_cfg, i) for i in range(moe_cfg.model.n_layers))
    print(f"{PROG}: wrote {path}: {n_moe} MoE layers x {plan.num_experts} experts (hidden {plan.expert_hidden}, "
          f"{plan.slices} slice{'s' if plan.slices > 1 else ''} of {moe_cfg.model.ffn_hidden}), top-{plan.top_k}, "
          f"router {plan.router}, step {step}, fresh optimizer")
    print(f"{PROG}: train it with: python -m moetrain.train --config {os.path.join(args.out, 'upcycled.yaml')}")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("dense", help="dense checkpoint: step_NNNNNNNN directory or checkpoint.dir")
    ap.add_argument("--out", required=True, help="checkpoint.dir to write the MoE checkpoint into (new or empty)")
    ap.add_argument("--config", help="target YAML config (default: the dense run's config from its manifest)")
    ap.add_argument("--noise", type=float, default=0.0, help="relative noise added to each expert (default 0: exact)")
    ap.add_argument("--router", default="auto", choices=("auto", "grouped", "zero"),
                    help="router init: auto = grouped when the gates of a token sum to 1 (renormalized top-k, "
                         "gshard, noisy_topk, aux_free), else zero; both reproduce the dense output")
    ap.add_argument("--keep-step", action="store_true", help="keep the dense step and tokens_seen (default: step 0)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the router init and noise (default train.seed)")
    ap.add_argument("overrides", nargs="*", help="target config overrides, e.g. moe.num_experts=8")
    args = ap.parse_intermixed_args(argv)
    return run_tool(PROG, lambda: upcycle(args), (ConfigError, growth.GrowthError))


if __name__ == "__main__":
    raise SystemExit(main())
