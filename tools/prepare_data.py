#!/usr/bin/env python3
"""Turn a corpus into a moetrain token directory (train.bin, val.bin, meta.json).

Read by ``data.source: memmap`` with ``data.path: DIR``. Inputs (``--format``, default chosen by
extension; formats and their layouts in moetrain/data_formats.py):

  text      text files and directories (default; directories walked recursively, ``--glob``);
  jsonl     JSON Lines, one document per line, text in ``--field`` (default "text");
  parquet   Parquet, one document per row of the string column ``--field`` (needs pyarrow);
  nanogpt   flat binaries of uint16/uint32 token ids (``--dtype``, required), nanoGPT's
            train.bin/val.bin;
  megatron  Megatron-LM indexed datasets, PREFIX.idx + PREFIX.bin.

Tokenizer (text, jsonl, parquet). Default byte level: one token per byte, ids 0..255, end of
document = byte 0 (as in the embedded stdlib corpus). ``--tokenizer PATH/tokenizer.json``: any
Hugging Face ``tokenizers`` file (nothing is downloaded); it is copied into the output directory
and meta.json records {"kind": "hf", "file": "tokenizer.json", "sha256", "eod_id", ...}. End of
document: the token ``--eod-token TEXT``, else the first of <|endoftext|>, </s>, <eos>,
<|end_of_text|> the tokenizer has, else the tool refuses (one line asking for --eod-token).
``--vocab`` defaults to 256 for bytes and to the tokenizer's vocabulary (max id + 1); token ids
are stored as uint8 / uint16 / uint32 as the vocabulary needs (<= 256 / 65536 / 2**32).
Text files go through the tokenizer as UTF-8 (invalid bytes replaced, one warning).

Already-tokenized input (nanogpt, megatron) keeps its ids. ``--vocab`` is required unless
``--tokenizer`` names the tokenizer the ids came from (then it is copied and recorded as above;
without one meta.json says "tokenizer": "none"). Every id must be < vocab, checked per file
(an id over it usually means the wrong ``--dtype``). End of document: nanoGPT files have no
boundaries (nanoGPT's prepare scripts already wrote one end-of-text token per document), so
nothing is inserted. Megatron documents are followed by ``--eod-id N`` (default: the
tokenizer's end-of-document id if ``--tokenizer``, else none: documents are concatenated as
stored), unless the document already ends with it (Megatron's ``--append-eod``).

Split. Each document has a key: a file's path relative to its input argument; a JSON line's
"FILE#LINE_INDEX" (0-based index of its line in the file, blank lines counted); a Parquet row's
"FILE#ROW" (0-based row index, null rows counted); a Megatron document's "PREFIX#DOC" (its
index in the .idx). A record's key, and so its side of the split, never depends on other
records being blank, null or empty. With several
documents, a document goes to val when ``zlib.crc32(key) % 10000 < round(val_frac * 10000)``,
so the split depends only on names and is stable as data is added. With a single document, or
when that split would leave either side empty, the last ``val_frac`` of the tokens is val.
nanoGPT input that is exactly a train.bin and a val.bin (e.g. one directory holding both) keeps
that split.

Hostile inputs. Only regular files are read. Inside a directory, anything else (FIFO, socket,
character or block device, a symlink to one such as /dev/zero, a dangling symlink) is skipped
with one warning line each on stderr; a symlinked directory is not followed (one warning line).
A symlink to a regular file is read (datasets are often assembled from links). An input named
on the command line that is not a regular file or directory is an error (one line, exit 2).
Files are opened non-blocking and re-checked with fstat, so a file swapped for a FIFO between
the scan and the read cannot hang the tool. Reads are bounded: a file larger than
``--max-file-mb`` (default 1024 MiB), or inputs adding up to more than ``--max-total-mb``
(default 4096 MiB), are refused with one line naming the file and the flag to raise (exit 2)
rather than skipped, since a silently partial dataset is worse than a refusal. Sizes are
checked from stat before anything is read, and again while reading (a file may grow, and some
regular files, e.g. under /proc, report size 0). A Parquet column whose uncompressed size (per
the file's metadata) is over either limit is refused before it is decompressed. The tool holds about 4x the input in memory
(more with a tokenizer).

Every problem with the inputs (a bad file: invalid JSON line, missing field, empty Parquet,
truncated or bad-magic Megatron index, a .bin truncated or of the wrong dtype, ids over the
vocabulary) is one line ``prepare_data: error: FILE: what is wrong``, exit 2, before anything
is written. The tool does not import torch.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


from moetrain.data import DOC_SEPARATOR, MAX_VOCAB, DataError, write_token_dir  # noqa: E402
from moetrain.data_formats import (FORMATS, MIB, TOKEN_FORMATS, InputError,  # noqa: E402
                                   check_token_range, collect_files, detect_format, megatron_files,
                                   parse_jsonl, parse_megatron, parse_nanogpt, parse_parquet, read_files)

DEFAULT_MAX_FILE_MB = 1024
DEFAULT_MAX_TOTAL_MB = 4096
DEFAULT_GLOB = {"text": "*", "jsonl": "*.jsonl", "parquet": "*.parquet", "nanogpt": "*.bin"}


def _warn(msg: str) -> None:
    print(f"prepare_data: warning: {msg}", file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokenize a corpus (text files, JSON Lines, Parquet) or convert an already "
                    "tokenized one (nanoGPT, Megatron-LM) into a moetrain token directory "
                    "(train.bin/val.bin/meta.json) for data.source=memmap.")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR",
                   help="files, or directories walked recursively in sorted order "
                        "(hidden files and directories skipped); Megatron: PREFIX, PREFIX.idx or PREFIX.bin")
    p.add_argument("--out", required=True, help="output token directory (replaced atomically)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="input format (default: by extension: .jsonl, .parquet, .idx or .bin beside "
                        "a .idx = megatron, other .bin = nanogpt, anything else and directories = text)")
    p.add_argument("--field", default="text", help="jsonl/parquet: the text field or column (default 'text')")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a Hugging Face tokenizers file (tokenizer.json); default: byte level")
    p.add_argument("--eod-token", default=None, metavar="TEXT",
                   help="the tokenizer's end-of-document token (default: the first of <|endoftext|>, "
                        "</s>, <eos>, <|end_of_text|> it has)")
    p.add_argument("--eod-id", type=int, default=None, metavar="N",
                   help="megatron: token id appended after each document (default: the tokenizer's "
                        "end of document with --tokenizer, else none)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                   help="nanogpt: the token id type of the .bin files (required; nanoGPT writes uint16)")
    p.add_argument("--val-frac", type=float, default=0.02,
                   help="fraction of documents (or of tokens, for one document) held out for val "
                        "(default 0.02)")
    p.add_argument("--vocab", type=int, default=None,
                   help=f"vocab_size recorded in meta.json, 1..{MAX_VOCAB}; every id must be below it "
                        "(default: 256 for bytes, the tokenizer's size with --tokenizer; required for "
                        "pre-tokenized input without --tokenizer)")
    p.add_argument("--glob", default=None,
                   help="only files whose name matches this pattern inside directories, "
                        "e.g. '*.txt' (default '*', or '*.jsonl', '*.parquet', '*.bin' for those formats)")
    p.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB,
                   help="refuse (exit 2) any input file larger than this many MiB "
                        f"(default {DEFAULT_MAX_FILE_MB})")
    p.add_argument("--max-total-mb", type=float, default=DEFAULT_MAX_TOTAL_MB,
                   help="refuse (exit 2) inputs adding up to more than this many MiB; the tool "
                        f"holds about 4x the input in memory (default {DEFAULT_MAX_TOTAL_MB})")
    args = p.parse_args(argv)
    for flag in ("max_file_mb", "max_total_mb"):
        if not 0 < getattr(args, flag) < float("inf"):
            p.error(f"--{flag.replace('_', '-')} must be a positive number, got {getattr(args, flag)}")
    if not 0.0 < args.val_frac < 1.0:
        p.error(f"--val-frac must be in (0, 1), got {args.val_frac}")
    if args.vocab is not None and not 1 <= args.vocab <= MAX_VOCAB:
        p.error(f"--vocab must be in 1..{MAX_VOCAB}, got {args.vocab}")
    if args.eod_id is not None and args.eod_id < 0:
        p.error(f"--eod-id must be >= 0, got {args.eod_id}")
    return args


def split_documents(docs: list[tuple[str, np.ndarray]], val_frac: float,
                    unit: str = "file") -> tuple[np.ndarray, np.ndarray, str]:
    """(train tokens, val tokens, split method) from (key, 1-D token array) documents: by key
    when both sides are non-empty ("by_<unit>"), else the tail of the concatenation
    ("tail_tokens"; see the module docstring)."""
    if len(docs) > 1:
        threshold = round(val_frac * 10000)
        is_val = [zlib.crc32(key.encode("utf-8")) % 10000 < threshold for key, _ in docs]
        if 0 < sum(is_val) < len(docs):
            train = np.concatenate([d for (_, d), v in zip(docs, is_val) if not v])
            val = np.concatenate([d for (_, d), v in zip(docs, is_val) if v])
            return train, val, f"by_{unit}"
    stream = np.concatenate([d for _, d in docs])
    if len(stream) < 2:
        raise InputError("input has fewer than 2 tokens; cannot make train and val splits")
    num_val = min(len(stream) - 1, max(1, round(len(stream) * val_frac)))
    return stream[:-num_val], stream[-num_val:], "tail_tokens"


def _load_tokenizer(args, need_eod: bool):
    from moetrain.tokenizer import HFCodec

    codec = HFCodec.from_file(args.tokenizer, args.eod_token)
    if need_eod and codec.eod_id is None:
        raise InputError(f"{args.tokenizer}: no end-of-document token found (none of <|endoftext|>, </s>, "
                         "<eos>, <|end_of_text|>); name one with --eod-token TEXT")
    return codec


def _text_documents(args, fmt, files, contents, codec):
    """(key, token array) per non-empty document of a text/jsonl/parquet input."""
    records: list[tuple[str, "str | bytes"]] = []
    for (key, path, _), data in zip(files, contents):
        if fmt == "text":
            records.append((key, data))
        elif fmt == "jsonl":
            records += [(f"{key}#{i}", t) for i, t in parse_jsonl(path, data, args.field, _warn)]
        else:
            limit = int(min(args.max_file_mb, args.max_total_mb) * MIB)
            records += [(f"{key}#{i}", t) for i, t in parse_parquet(path, data, args.field, _warn, limit)]
    records = [(k, r) for k, r in records if r]   # empty files and empty texts are no documents
    if not records:
        raise InputError("all input files are empty; nothing to tokenize")
    if codec is None:   # bytes: a text file's bytes as they are, then the 0 byte
        return [(k, np.frombuffer((r if isinstance(r, bytes) else r.encode("utf-8")) + DOC_SEPARATOR,
                                  dtype=np.uint8)) for k, r in records]
    texts, bad = [], []
    for k, r in records:
        if isinstance(r, bytes):
            try:
                r = r.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(k)
                r = r.decode("utf-8", errors="replace")
        texts.append(r)
    if bad:
        _warn(f"{len(bad)} file(s) are not valid UTF-8 (first: {bad[0]}); invalid bytes replaced by U+FFFD")
    ids = codec.encode_batch(texts)
    dtype = np.uint32 if codec.vocab_size > 65536 else np.uint16 if codec.vocab_size > 256 else np.uint8
    return [(k, np.array([*t, codec.eod_id], dtype=dtype)) for (k, _), t in zip(records, ids)]


def _token_documents(args, fmt, files, contents, vocab, eod_id):
    """nanogpt: (key, tokens) per file, and whether the files are a train.bin/val.bin pair;
    megatron: (key, tokens) per document, eod_id appended unless already there."""
    docs = []
    if fmt == "nanogpt":
        for (key, path, _), data in zip(files, contents):
            tokens = parse_nanogpt(path, data, args.dtype)
            check_token_range(path, tokens, vocab, f"wrong --dtype {args.dtype} for this file, or --vocab too small")
            docs.append((key, tokens))
        return docs, sorted(k for k, _ in docs) == ["train.bin", "val.bin"]
    for i in range(0, len(files), 2):
        (key, idx_path, _), (_, bin_path, _) = files[i], files[i + 1]
        stem = key[: -len(".idx")]
        for d, tokens in enumerate(parse_megatron(idx_path, contents[i], bin_path, contents[i + 1])):
            check_token_range(bin_path, tokens, vocab, "--vocab too small for this dataset's ids")
            if not tokens.size:
                continue
            if eod_id is not None and tokens[-1] != eod_id:   # the dtype widens only if eod_id needs it
                eod = np.array([eod_id], dtype=np.result_type(tokens.dtype, np.min_scalar_type(eod_id)))
                tokens = np.concatenate([tokens, eod])
            docs.append((f"{stem}#{d}", tokens))
    if not docs:
        raise InputError("the Megatron datasets hold no tokens")
    return docs, False


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from moetrain.tokenizer import TokenizerError

    try:
        fmt = args.format or detect_format(args.inputs)
        pretokenized = fmt in TOKEN_FORMATS
        if args.dtype is not None and fmt != "nanogpt":
            raise InputError(f"--dtype is for nanogpt input, not {fmt}")
        if fmt == "nanogpt" and args.dtype is None:
            raise InputError("--dtype uint16|uint32 is required for nanogpt input (nothing in the file says "
                             "which; nanoGPT writes uint16)")
        if args.eod_id is not None and fmt != "megatron":
            raise InputError(f"--eod-id is for megatron input; {fmt} input "
                             + ("has no document boundaries" if fmt == "nanogpt" else "uses --eod-token"))
        codec = _load_tokenizer(args, need_eod=not pretokenized) if args.tokenizer else None
        if args.eod_token is not None and codec is None:
            raise InputError("--eod-token needs --tokenizer")
        if args.vocab is not None:
            vocab = args.vocab
        elif codec is not None:
            vocab = codec.vocab_size
        elif pretokenized:
            raise InputError(f"--vocab is required for {fmt} input without --tokenizer (ids are checked against it)")
        else:
            vocab = 256
        if codec is not None and vocab < codec.vocab_size:
            raise InputError(f"--vocab {vocab} is smaller than the tokenizer's vocabulary ({codec.vocab_size} ids)")
        eod_id = args.eod_id if args.eod_id is not None else (codec.eod_id if codec else
                                                              (None if pretokenized else 0))
        if eod_id is not None and eod_id >= vocab:
            raise InputError(f"end-of-document id {eod_id} is not below the vocabulary size {vocab}")

        if fmt == "megatron":
            files = megatron_files(args.inputs, _warn)
        else:
            files = collect_files(args.inputs, args.glob or DEFAULT_GLOB.get(fmt, "*"), _warn)
        contents = read_files(files, int(args.max_file_mb * MIB), int(args.max_total_mb * MIB))
        pair = False
        if pretokenized:
            docs, pair = _token_documents(args, fmt, files, contents, vocab, eod_id)
        else:
            docs = _text_documents(args, fmt, files, contents, codec)
        if pair:
            split = dict(docs)
            train, val, method = split["train.bin"], split["val.bin"], "train_val_files"
        else:
            train, val, method = split_documents(docs, args.val_frac,
                                                 "file" if fmt in ("text", "nanogpt") else "document")
        if not pretokenized:   # pre-tokenized ids were checked per file (check_token_range)
            top = max(int(train.max()) if train.size else 0, int(val.max()) if val.size else 0)
            if top >= vocab:
                what = "byte" if codec is None else "token id"
                raise InputError(f"input contains {what} {top} but --vocab is {vocab}")
        tokenizer_meta = codec.meta() if codec else ("none" if pretokenized else "bytes")
        num_files = len(files) // 2 if fmt == "megatron" else len(files)
        meta = {"source": f"prepare_data: {fmt}, {num_files} files from {' '.join(args.inputs)}",
                "format": fmt, "tokenizer": tokenizer_meta, "eod_id": eod_id, "split": method,
                "val_frac": args.val_frac, "num_files": len(docs) if fmt == "text" else num_files,
                "num_documents": len(docs)}
        if fmt in ("jsonl", "parquet"):
            meta["field"] = args.field
        write_token_dir(args.out, train, val, vocab, meta,
                        extra_files={tokenizer_meta["file"]: codec.content} if codec else None)
    except (InputError, DataError, TokenizerError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"prepare_data: error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {train.size} train / {val.size} val tokens, vocab {vocab}, "
          f"{fmt}, {len(docs)} documents, split {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
