#!/usr/bin/env python
"""Inspect, verify and convert moetrain checkpoints (one process, no process group).

    python tools/ckpt_inspect.py CKPT                       # step, layout, files, every tensor
    python tools/ckpt_inspect.py CKPT --verify              # + read every byte, check completeness
    python tools/ckpt_inspect.py CKPT --consolidate full.pt # one file: torch.save (or .safetensors)
    python tools/ckpt_inspect.py --from-consolidated full.pt --out CKPT_DIR   # back to sharded
    python tools/ckpt_inspect.py OLD_CKPT --upgrade CKPT_DIR  # format_version 1 -> current

CKPT is a step_NNNNNNNN directory, a checkpoint.dir (then its newest complete checkpoint) or a
checkpoint.dir's `latest` file.

The consolidated file (torch) is {"model": state dict of the full model (experts stacked
[E, ...], loads into a world-1 Transformer), "optim": {param: {state: tensor}}, "train": {step,
tokens_seen}, "rng": {rank: {part: tensor}}, "manifest": dict}; read back with
torch.load(weights_only=True). As .safetensors (needs the safetensors package) the same tensors
are flat under their checkpoint keys with experts stacked (model/<fqn>, optim/<fqn>/<state>,
train/step, rng/rank_<r>/<part>) and the manifest as JSON in the file's metadata.
--from-consolidated writes <out>/step_<step>/ and updates <out>/latest; the result resumes at any
layout like a checkpoint written by training.

Reading never runs code from the checkpoint (see moetrain/checkpoint/dcp_reader.py): a crafted one is
refused with one line. --upgrade rewrites a format_version 1 checkpoint (an older moetrain, which
pickled the RNG states: refused everywhere else) into CKPT_DIR: every tensor is kept, the
pickled RNG states are dropped unread (a resume starts fresh RNG streams).

Exit codes: 0 ok, 1 the checkpoint is damaged, incomplete or refused, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moetrain.checkpoint import state as S  # noqa: E402
from moetrain.checkpoint.convert import (load_all, read_consolidated, resolve, run_tool,  # noqa: E402
                                   save_consolidated, upgrade, write_sharded)
from moetrain.checkpoint import store  # noqa: E402
from moetrain.checkpoint.store import CheckpointError  # noqa: E402


def describe(info: store.CheckpointInfo, out=sys.stdout) -> None:
    m = info.manifest
    files = m.get("files", {})
    print(f"checkpoint {info.path}", file=out)
    print(f"  step {info.step}  tokens_seen {m.get('tokens_seen')}  world {m.get('world')}  "
          f"layout {m.get('layout')}  experts {m.get('num_experts')}", file=out)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created"])) if "created" in m else "?"
    print(f"  format {m.get('format')} v{m.get('format_version')}  torch {m.get('torch_version')}  "
          f"created {created}  save {m.get('save_s', '?')}s  async {m.get('async_save')}", file=out)
    print(f"  files {len(files)}, {sum(files.values()) / 2**20:.2f} MiB: "
          + ", ".join(f"{k} ({v} B)" for k, v in sorted(files.items())), file=out)
    rows = []
    for key, md in sorted(info.metadata.state_dict_metadata.items()):
        expert = ""
        if (mk := S.parse_model_key(key)) is not None and mk[1] is not None:
            expert = str(mk[1])
        elif (ok := S.parse_optim_key(key)) is not None and ok[1] is not None:
            expert = str(ok[1])
        rows.append((key, "x".join(map(str, md.size)) or "scalar", str(md.properties.dtype).replace("torch.", ""),
                     expert))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"  {'tensor':<{width}}  {'shape':<14} {'dtype':<8} expert", file=out)
    for key, shape, dtype, expert in rows:
        print(f"  {key:<{width}}  {shape:<14} {dtype:<8} {expert}", file=out)


def verify_deep(info: store.CheckpointInfo) -> dict:
    """Beyond store.verify (files, sizes, chunk bounds): every byte reads back, every expert
    0..E-1 of every expert tensor (and of its optimizer state) is present."""
    flat = load_all(info)
    full = S.to_consolidated(flat, info.manifest)     # raises on gaps in expert ids
    num = info.manifest.get("num_experts")
    for name in info.manifest.get("expert_tensors", []):
        if name not in full["model"]:
            raise CheckpointError(f"checkpoint {info.path}: expert tensor {name} is missing")
        if num and full["model"][name].shape[0] != num:
            raise CheckpointError(f"checkpoint {info.path}: {name} has {full['model'][name].shape[0]} experts, "
                                  f"manifest says {num}")
    for name in full["optim"]:
        if name not in full["model"]:
            raise CheckpointError(f"checkpoint {info.path}: optimizer state for {name}, which is not a model tensor")
    bad = [k for k, v in flat.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        print(f"warning: non-finite values in {len(bad)} tensors, e.g. {bad[0]}", file=sys.stderr)
    return full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ckpt_inspect", description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="step_NNNNNNNN directory or checkpoint.dir")
    ap.add_argument("--verify", action="store_true", help="read every tensor and check completeness")
    ap.add_argument("--consolidate", metavar="OUT", help="write one consolidated file (.pt, or .safetensors)")
    ap.add_argument("--from-consolidated", metavar="IN", help="convert a consolidated file back into a sharded checkpoint")
    ap.add_argument("--out", metavar="CKPT_DIR", help="checkpoint.dir to write with --from-consolidated")
    ap.add_argument("--upgrade", metavar="CKPT_DIR", help="rewrite a format_version 1 checkpoint into CKPT_DIR "
                    "(its pickled RNG states are dropped unread)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no tensor listing")
    args = ap.parse_args(argv)

    def body():
        if args.from_consolidated:
            if not args.out:
                ap.error("--from-consolidated needs --out CKPT_DIR")
            path = write_sharded(read_consolidated(args.from_consolidated), args.out, args.from_consolidated)
            print(f"wrote {path}")
            return
        if not args.path:
            ap.error("give a checkpoint path (or --from-consolidated IN --out DIR)")
        if args.upgrade:
            print(f"wrote {upgrade(args.path, args.upgrade)}")
            return
        info = resolve(args.path)
        if not args.quiet:
            describe(info)
        full = None
        if args.verify:
            full = verify_deep(info)
            print(f"OK: {info.path} is complete ({len(info.metadata.state_dict_metadata)} entries read back)")
        if args.consolidate:
            full = full or S.to_consolidated(load_all(info), info.manifest)
            save_consolidated(full, args.consolidate)
            print(f"wrote {args.consolidate}")
    return run_tool("ckpt_inspect", body)


if __name__ == "__main__":
    raise SystemExit(main())
