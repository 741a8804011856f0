#!/usr/bin/env python
"""Evaluate checkpoints and their ensemble (average of output probabilities) on the validation set.

    python tools/ensemble_eval.py CKPT CKPT [...] [--eval-batches N] [--batch-size B] [--seq-len S]
                                  [--micro-batch M] [--device cpu|cuda] [--json]

Each CKPT is a step_NNNNNNNN directory or a checkpoint.dir (its newest complete checkpoint); the
models may differ in anything but the vocabulary (dense, MoE, deeper...). One process, world 1.
All models see the same windows: data.* of the FIRST checkpoint's config and moetrain.data's
eval_batches with train.eval_batches x train.global_batch_size windows of train.seq_len tokens
(again the first checkpoint's, or the flags), i.e. exactly what training reports as val_loss.

Prints each model's val loss (nats/token), the ensemble's (-log of the mean probability of the
next token) and the members' mean; the ensemble's is never above that mean (convexity of -log).

Exit codes: 0 ok, 1 a checkpoint is damaged or unreadable, 2 bad arguments, e.g. checkpoints
with different vocabularies (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]

import torch  # noqa: E402
from moetrain.checkpoint.convert import read_checkpoint, resolve, run_tool  # noqa: E402

from moetrain import growth  # noqa: E402
from moetrain.config import ConfigError  # noqa: E402
from moetrain.data import DataError, eval_batches, load_token_data  # noqa: E402

PROG = "ensemble_eval"


def check_vocab(infos: list) -> int:
    """The shared vocabulary size, from the manifests (before reading any tensor)."""
    sizes = []
    for info in infos:
        vocab = (info.manifest.get("config") or {}).get("model", {}).get("vocab_size")
        if vocab is None:
            raise growth.GrowthError(f"checkpoint {info.path}: manifest.json has no model.vocab_size")
        sizes.append(vocab)
    if len(set(sizes)) > 1:
        i = next(k for k, v in enumerate(sizes) if v != sizes[0])
        raise growth.GrowthError(f"checkpoints have different vocabularies: {infos[0].path} has model.vocab_size="
                                 f"{sizes[0]}, {infos[i].path} has {sizes[i]}; an ensemble averages probabilities "
                                 "over one vocabulary")
    return sizes[0]


def evaluate(paths: list[str], eval_batches_n=None, batch_size=None, seq_len=None, micro=None,
             device: str = "cpu") -> dict:
    infos = [resolve(p) for p in paths]
    vocab = check_vocab(infos)
    first = growth.config_from_dict(infos[0].manifest.get("config"))
    t = first.train
    n_batches = eval_batches_n or t.eval_batches
    batch_size = batch_size or t.global_batch_size
    seq_len = seq_len or t.seq_len
    micro = micro or min(t.micro_batch_size, batch_size)
    dev = torch.device(device)
    models, rows = [], []
    for path in paths:
        info, full = read_checkpoint(path)
        cfg = growth.config_from_dict(full["manifest"].get("config"))
        if seq_len > cfg.model.max_seq_len:
            raise growth.GrowthError(f"--seq-len {seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} of "
                                     f"{info.path}")
        models.append(growth.build_model(cfg, full["model"]).to(dev))
        rows.append({"path": info.path, "step": info.step, "n_layers": cfg.model.n_layers,
                     "num_experts": cfg.moe.num_experts})
    data = load_token_data(first.data.source, first.data.path, vocab, first.data.cache_dir)
    batches = eval_batches(data.val, n_batches, batch_size, seq_len)
    losses, ens = growth.ensemble_losses(models, batches, micro, dev)
    for r, loss in zip(rows, losses):
        r["val_loss"] = loss
    return {"models": rows, "ensemble_val_loss": ens, "mean_val_loss": sum(losses) / len(losses),
            "windows": n_batches * batch_size, "seq_len": seq_len, "data": data.source}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="+", help="checkpoints (step directories or checkpoint.dirs)")
    ap.add_argument("--eval-batches", type=int, help="default: train.eval_batches of the first checkpoint")
    ap.add_argument("--batch-size", type=int, help="windows per batch (default: its train.global_batch_size)")
    ap.add_argument("--seq-len", type=int, help="default: its train.seq_len")
    ap.add_argument("--micro-batch", type=int, help="windows per forward pass (default: its train.micro_batch_size)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_intermixed_args(argv)
    for name in ("eval_batches", "batch_size", "seq_len", "micro_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"{PROG}: error: --{name.replace('_', '-')}={v} must be >= 1", file=sys.stderr)
            return 2
    def body():
        res = evaluate(args.ckpts, args.eval_batches, args.batch_size, args.seq_len, args.micro_batch, args.device)
        if args.json:
            print(json.dumps(res))
        else:
            print_table(res)
    return run_tool(PROG, body, (ConfigError, DataError, growth.GrowthError))


def print_table(res: dict) -> None:
    width = max(len(r["path"]) for r in res["models"])
    print(f"val windows: {res['windows']} x {res['seq_len']} tokens of {res['data']}")
    print(f"{'checkpoint':<{width}}  {'step':>6}  {'layers':>6}  {'experts':>7}  val_loss")
    for r in res["models"]:
        print(f"{r['path']:<{width}}  {r['step']:>6}  {r['n_layers']:>6}  {r['num_experts']:>7}  {r['val_loss']:.4f}")
    print(f"{'mean of the ' + str(len(res['models'])) + ' models':<{width}}  {'':>6}  {'':>6}  {'':>7}  "
          f"{res['mean_val_loss']:.4f}")
    print(f"{'ensemble (mean probability)':<{width}}  {'':>6}  {'':>6}  {'':>7}  {res['ensemble_val_loss']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
