#!/usr/bin/env python3
"""Bytes vs a BPE tokenizer on the embedded stdlib corpus, compared in bits per byte.

Per-token losses of different tokenizers are not comparable (a BPE token stands for ~3-4 bytes),
so the report converts each run's final val loss to bits per byte of the same val text:

    bpb = val_loss [nats/token] * target tokens / target bytes / ln 2

over the exact validation windows the trainer evaluates (data.eval_batches with the run's
train.eval_batches, train.global_batch_size, train.seq_len): the bytes a window's target tokens
stand for are counted token by token (byte-level BPE: one vocabulary character per byte; the
end-of-document token stands for the one 0 byte it replaces).

    # 1. train a byte-level BPE (ids: <|endoftext|> = 0) on the corpus's train split, and write
    #    the corpus (same files, same train/val split as data.source=stdlib) tokenized with it
    python tools/bench_tokenizer.py prepare --vocab-size 2048 --out /tmp/stdlib-bpe2048
    # 2. train both (the same config and steps; only the data and model.vocab_size differ)
    torchrun --standalone --nproc_per_node 2 -m moetrain.train --config configs/tiny_cpu.yaml \\
        parallel.ep=2 train.steps=200 logging.run_name=tok_bytes
    torchrun --standalone --nproc_per_node 2 -m moetrain.train --config configs/tiny_cpu.yaml \\
        parallel.ep=2 train.steps=200 logging.run_name=tok_bpe model.vocab_size=2048 \\
        data.source=memmap data.path=/tmp/stdlib-bpe2048
    # 3. compare
    python tools/bench_tokenizer.py report runs/tok_bytes runs/tok_bpe

Needs the `tokenizers` package (the `hf` extra) for step 1 and for reporting a BPE run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from moetrain.data import (DOC_SEPARATOR, build_stdlib_corpus, eval_batches,  # noqa: E402
                           load_token_data, write_token_dir)

EOD = "<|endoftext|>"


def _docs(path: Path) -> list[str]:
    """A byte-level split of the corpus cache back into its files' texts (0 byte = end of file)."""
    raw = np.fromfile(path, dtype=np.uint8).tobytes()
    parts = raw.split(DOC_SEPARATOR)
    assert parts[-1] == b"", f"{path}: does not end with a document separator"
    return [p.decode("utf-8", errors="replace") for p in parts[:-1]]   # 4 of ~1750 stdlib files are not UTF-8


def prepare(args) -> int:
    import tokenizers as tk

    from moetrain.tokenizer import HFCodec

    corpus = Path(build_stdlib_corpus(args.cache_dir))
    train_docs, val_docs = _docs(corpus / "train.bin"), _docs(corpus / "val.bin")
    t0 = time.time()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOD], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs, trainer)
    out = Path(args.out)
    tmp_file = out.parent / f".{out.name}.tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_file))
    codec = HFCodec.from_file(tmp_file)
    tmp_file.unlink()
    trained_s = time.time() - t0
    splits = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids = codec.encode_batch(docs)
        splits[name] = np.concatenate([np.array([*d, codec.eod_id], dtype=np.int64) for d in ids])
    val_bytes = sum(len(d.encode("utf-8")) + 1 for d in val_docs)
    write_token_dir(out, splits["train"], splits["val"], codec.vocab_size, {
        "source": f"bench_tokenizer: {corpus} re-tokenized with a byte-level BPE of {codec.vocab_size}",
        "tokenizer": codec.meta(), "eod_id": codec.eod_id, "split": "as data.source=stdlib",
        "num_val_bytes": val_bytes}, extra_files={"tokenizer.json": codec.content})
    print(f"trained BPE vocab {codec.vocab_size} in {trained_s:.1f}s; wrote {out}: "
          f"{splits['train'].size} train / {splits['val'].size} val tokens; val {val_bytes} bytes "
          f"= {val_bytes / splits['val'].size:.3f} bytes/token")
    return 0


def _byte_lengths(token_dir: str | None, vocab: int) -> np.ndarray:
    """Bytes each token id stands for: 1 for byte tokens; for the bench's byte-level BPE the
    length of its vocabulary string (one character per byte), 1 for the end-of-document token."""
    if token_dir is None:
        return np.ones(vocab, dtype=np.int64)
    from moetrain.tokenizer import load_codec

    codec = load_codec(token_dir)
    if codec.kind == "bytes":
        return np.ones(vocab, dtype=np.int64)
    lengths = np.zeros(vocab, dtype=np.int64)
    for i in range(codec.vocab_size):
        s = codec.token_str(i)
        lengths[i] = 1 if i == codec.eod_id else (len(s) if s is not None else 0)
    return lengths


def report(args) -> int:
    from moetrain.config import load_config

    rows = []
    for run in args.runs:
        run = Path(run)
        cfg = load_config(str(run / "config.yaml"))
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = [r for r in recs if "val_loss" in r][-1]
        data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size, cfg.data.cache_dir)
        lengths = _byte_lengths(cfg.data.path if cfg.data.source == "memmap" else None, cfg.model.vocab_size)
        t = cfg.train
        targets = np.concatenate([b[:, 1:].reshape(-1).numpy()
                                  for b in eval_batches(data.val, t.eval_batches, t.global_batch_size, t.seq_len)])
        n_bytes = int(lengths[targets].sum())
        bpb = last["val_loss"] * targets.size / n_bytes / math.log(2)
        rows.append((run.name, cfg.model.vocab_size, last["step"], last["val_loss"], targets.size, n_bytes, bpb))
    print("| run | vocab | step | val loss (nats/token) | eval tokens | eval bytes | bytes/token | bits/byte |")
    print("|---|---|---|---|---|---|---|---|")
    for name, vocab, step, loss, n_tok, n_bytes, bpb in rows:
        print(f"| {name} | {vocab} | {step} | {loss:.4f} | {n_tok} | {n_bytes} | {n_bytes / n_tok:.3f} | {bpb:.4f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train a byte-level BPE on the stdlib corpus and write the corpus with it")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--out", required=True, help="output token directory")
    p.add_argument("--cache-dir", default=None, help="stdlib corpus cache (default $MOETRAIN_CACHE or ~/.cache/moetrain)")
    r = sub.add_parser("report", help="final val loss per token and bits per byte of finished runs")
    r.add_argument("runs", nargs="+", help="run directories (logging.dir/logging.run_name)")
    args = ap.parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else report(args)


if __name__ == "__main__":
    sys.exit(main())
