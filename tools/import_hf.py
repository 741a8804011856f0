#!/usr/bin/env python
"""Import a Hugging Face `transformers` model directory as a moetrain checkpoint.

    python tools/import_hf.py --hf HFDIR --out CKPT_DIR [--set group.key=value ...]

HFDIR: config.json + safetensors (one file or shards with model.safetensors.index.json) of a
LlamaForCausalLM (dense: train it as is, or upcycle it with tools/upcycle.py),
MixtralForCausalLM, Qwen2MoeForCausalLM (shared expert gate zero, as export_hf writes it) or
Glm4MoeForCausalLM (router aux_free). The tensor algebra (RoPE row permutation, grouped-query
attention kept as model.n_kv_heads, the shared expert's factor): moetrain/hf/mapping.py. The first forward pass
of the imported model equals the HF model's (dropless: moe.capacity_factor=null).

Writes CKPT_DIR/step_00000000/ (model only: the optimizer and RNG streams start fresh) plus
CKPT_DIR/imported.yaml: our defaults + the model's keys + --set overrides, with
checkpoint.dir=CKPT_DIR and checkpoint.resume=auto. Train from it, at any layout:
    python -m moetrain.train --config CKPT_DIR/imported.yaml [parallel.ep=2 ...]

Exit codes: 0 ok, 1 damaged or unreadable HF files (bad JSON, truncated safetensors, missing
shards) or output location, 2 a model that does not map (nonzero biases, sliding window, scaled
RoPE, gated shared expert, ...) or bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]

from upcycle import check_out_dir, write_checkpoint  # noqa: E402

from moetrain import growth  # noqa: E402
from moetrain.checkpoint.convert import run_tool  # noqa: E402
from moetrain.config import Config, ConfigError, to_dict  # noqa: E402
from moetrain.hf import files, mapping  # noqa: E402

PROG = "import_hf"
# keys import sets from the HF config that --set may still change (the rest fix the weights' shapes
# and the function they compute)
FREE_KEYS = {"moe.capacity_factor", "model.init_std", "train.seq_len"}


def import_hf(args) -> str:
    check_out_dir(args.out)
    hf_cfg, tensors = files.read_hf_dir(args.hf)
    plan = mapping.plan_import(hf_cfg, tensors)
    mapped = {o.split("=", 1)[0] for o in plan.overrides} - FREE_KEYS
    for item in args.set:
        if item.split("=", 1)[0] in mapped:
            raise mapping.HFMapError(f"--set {item}: {item.split('=', 1)[0]} comes from the HF model's config "
                                     f"(its weights have that shape and function); free keys include "
                                     f"{', '.join(sorted(FREE_KEYS))}, train.*, parallel.*")
    cfg = growth.config_from_dict(to_dict(Config()), [*plan.overrides, *args.set])
    state = mapping.from_hf_state(cfg, plan, tensors)
    stored = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.dtype != torch.float32})
    if stored:
        print(f"{PROG}: weights converted from {', '.join(stored)} to float32 (moetrain keeps fp32 master weights; "
              "bf16 is an autocast compute dtype)")
        state = {k: v.float() for k, v in state.items()}
    try:
        growth.build_model(cfg, state)      # the state fits the model
    except growth.GrowthError as exc:       # a --set that changes a shape
        raise mapping.HFMapError(f"the --set overrides change the model's shape ({exc})") from None
    notes = list(plan.notes)
    if cfg.moe.num_experts > 0:
        cf = cfg.moe.capacity_factor
        notes.append("dropless (moe.capacity_factor=null), as the HF model runs; a capacity can be set with --set"
                     if cf is None else f"moe.capacity_factor={cf} (--set): copies over capacity are dropped, unlike "
                     "in the HF model, so outputs match it only where no expert overflows")
    for note in notes:
        print(f"{PROG}: {note}")
    record = growth.checkpoint_record(cfg, state, 0, 0, imported_from={
        "path": os.path.abspath(args.hf), "architecture": plan.arch.class_name})
    path = write_checkpoint(record, args.out, args.hf, cfg, "imported.yaml", args.set, "-imported")
    e = cfg.moe
    what = "dense" if e.num_experts == 0 else (
        f"{sum(growth.is_moe_layer(cfg, i) for i in range(cfg.model.n_layers))} MoE layers x {e.num_ffn_experts} "
        f"experts (hidden {cfg.expert_hidden}), top-{e.routed_top_k}, router {e.router}"
        + (f", {e.shared_experts} shared" if e.shared_experts else ""))
    print(f"{PROG}: wrote {path} from {plan.arch.class_name}: {cfg.model.n_layers} layers, dim {cfg.model.dim}, "
          f"{what}, step 0, fresh optimizer")
    print(f"{PROG}: train it with: python -m moetrain.train --config {os.path.join(args.out, 'imported.yaml')}")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="checkpoint.dir to write the checkpoint into (new or empty)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the imported run, e.g. --set train.lr=1e-4 (repeatable)")
    args = ap.parse_args(argv)
    return run_tool(PROG, lambda: import_hf(args),
                    (ConfigError, growth.GrowthError, mapping.HFMapError, files.HFFileError))


if __name__ == "__main__":
    raise SystemExit(main())
