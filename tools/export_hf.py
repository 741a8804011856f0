#!/usr/bin/env python
"""Export a moetrain checkpoint as a Hugging Face `transformers` model directory.

    python tools/export_hf.py --checkpoint DIR --out HFDIR [--max-shard-size 5GB] [--dtype auto]

DIR: a step_NNNNNNNN directory or a checkpoint.dir (its newest complete checkpoint), any training
layout. HFDIR gets config.json and safetensors weights (model.safetensors, or shards plus
model.safetensors.index.json beyond --max-shard-size), and the training data's tokenizer.json
when the data had one; then

    transformers.AutoModelForCausalLM.from_pretrained(HFDIR)

is LlamaForCausalLM (dense), MixtralForCausalLM (top-k softmax routers with renormalized gates),
Qwen2MoeForCausalLM (shared experts, moe.every > 1, raw top-k gates) or Glm4MoeForCausalLM
(router aux_free), and its logits equal our eval forward. Which recipe maps to which, and the
tensor algebra (RoPE row permutation, the shared expert's factor 2): moetrain/hf/mapping.py.
A model trained with a capacity factor is exported dropless, as inference engines run it.

Exit codes: 0 ok, 1 the checkpoint is damaged or unreadable, 2 a model that does not map to a
transformers architecture (PEER, MoE++, expert choice, ...) or bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]

from moetrain import growth  # noqa: E402
from moetrain.checkpoint.convert import read_checkpoint, run_tool  # noqa: E402
from moetrain.config import ConfigError  # noqa: E402
from moetrain.hf import files, mapping  # noqa: E402
from moetrain.tokenizer import TokenizerError, codec_for_data  # noqa: E402

PROG = "export_hf"


def export(args) -> list:
    max_bytes = files.parse_size(args.max_shard_size)
    files.check_out_dir(args.out)
    if args.dtype != "auto" and args.dtype not in files.DTYPES:
        raise files.HFFileError(f"--dtype {args.dtype!r}: one of auto, {', '.join(files.DTYPES)}")
    info, full = read_checkpoint(args.checkpoint)
    cfg = growth.config_from_dict(full["manifest"].get("config"))
    plan = mapping.plan_export(cfg)
    for note in plan.notes:
        print(f"{PROG}: {note}")
    tensors = mapping.to_hf_state(cfg, plan, full["model"])
    stored = {str(t.dtype).replace("torch.", "") for t in full["model"].values() if t.is_floating_point()}
    dtype = args.dtype if args.dtype != "auto" else (stored.pop() if len(stored) == 1 else "float32")
    target = files.DTYPES[dtype]
    # the aux-free selection bias stays fp32, as the HF router holds it
    tensors = {k: t if k.endswith("e_score_correction_bias") else t.to(target) for k, t in tensors.items()}
    config = mapping.hf_config(cfg, plan, dtype)
    try:
        codec = codec_for_data(cfg.data.source, cfg.data.path)
    except TokenizerError as exc:
        codec = None
        print(f"{PROG}: no tokenizer exported: {exc}")
    if codec is not None and codec.eod_id is not None:
        config["eos_token_id"] = codec.eod_id       # bytes: 0, the end-of-document byte
    written = files.write_hf_dir(args.out, config, tensors, max_bytes)
    tok = codec is not None and codec.kind == "hf"
    if tok:
        written += files.write_tokenizer(codec, args.out, cfg.model.max_seq_len)
    n = sum(t.numel() for t in tensors.values())
    print(f"{PROG}: wrote {args.out}: {plan.arch.class_name}, {n:,} parameters ({dtype}), "
          f"{len(written)} files ({', '.join(written)}) from {info.path} (step {info.step})"
          + ("" if tok else "; no tokenizer file (byte-level or pre-tokenized training data)"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="step_NNNNNNNN directory or checkpoint.dir")
    ap.add_argument("--out", required=True, help="directory to write the HF model into (new or empty)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ap.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    args = ap.parse_args(argv)
    return run_tool(PROG, lambda: export(args),
                    (ConfigError, growth.GrowthError, mapping.HFMapError, files.HFFileError))


if __name__ == "__main__":
    raise SystemExit(main())
