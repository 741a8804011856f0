#!/usr/bin/env python3
"""Turn text files into a moetrain token directory (train.bin, val.bin, meta.json).

Read by ``data.source: memmap`` with ``data.path: DIR``. Tokenization is byte-level (one
token per byte, ids 0..255), the default and, for now, only tokenizer. Each file's bytes are
followed by one 0 byte as an end-of-document marker, as in the embedded stdlib corpus.

Split: with several files, a file goes to val when
``zlib.crc32(relative_posix_path) % 10000 < round(val_frac * 10000)``, so the split depends
only on file names and is stable as files are added. With a single file, or when the by-file
split would leave either side empty, the last ``val_frac`` of the concatenated bytes is val.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


from moetrain.data import DOC_SEPARATOR, DataError, byte_tokenize, write_token_dir  # noqa: E402


class InputError(Exception):
    """A user-facing problem with the inputs; reported as one line, exit code 2."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Byte-level tokenize text files into a moetrain token directory "
                    "(train.bin/val.bin/meta.json) for data.source=memmap. Byte-level "
                    "tokenization (vocab 256) is the default and only tokenizer for now.")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR",
                   help="text files, or directories walked recursively in sorted order "
                        "(hidden files and directories skipped)")
    p.add_argument("--out", required=True, help="output token directory (replaced atomically)")
    p.add_argument("--val-frac", type=float, default=0.02,
                   help="fraction of files (or of bytes, for one file) held out for val "
                        "(default 0.02)")
    p.add_argument("--vocab", type=int, default=256,
                   help="vocab_size recorded in meta.json, 1..65536; must cover every byte "
                        "present (default 256)")
    p.add_argument("--glob", default="*",
                   help="only files whose name matches this pattern inside directories, "
                        "e.g. '*.txt' (default '*')")
    args = p.parse_args(argv)
    if not 0.0 < args.val_frac < 1.0:
        p.error(f"--val-frac must be in (0, 1), got {args.val_frac}")
    if not 1 <= args.vocab <= 65536:
        p.error(f"--vocab must be in 1..65536, got {args.vocab}")
    return args


def collect_files(inputs: list[str], pattern: str) -> list[tuple[str, Path]]:
    """(split key, path) per input file; the key is the path relative to its input argument."""
    found = []
    for arg in inputs:
        root = Path(arg)
        if root.is_file():
            found.append((root.name, root))
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and fnmatch.fnmatch(name, pattern):
                        path = Path(dirpath) / name
                        found.append((path.relative_to(root).as_posix(), path))
        else:
            raise InputError(f"{arg}: no such file or directory")
    if not found:
        raise InputError(f"no input files found in {' '.join(inputs)} (glob {pattern!r})")
    return found


def read_documents(files: list[tuple[str, Path]]) -> list[tuple[str, bytes]]:
    docs = []
    for key, path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        if data:
            docs.append((key, data + DOC_SEPARATOR))
    if not docs:
        raise InputError("all input files are empty; nothing to tokenize")
    return docs


def split_documents(docs: list[tuple[str, bytes]], val_frac: float) -> tuple[bytes, bytes, str]:
    """(train bytes, val bytes, split method): by file when both sides are non-empty."""
    if len(docs) > 1:
        threshold = round(val_frac * 10000)
        is_val = [zlib.crc32(key.encode("utf-8")) % 10000 < threshold for key, _ in docs]
        if 0 < sum(is_val) < len(docs):
            train = b"".join(d for (_, d), v in zip(docs, is_val) if not v)
            val = b"".join(d for (_, d), v in zip(docs, is_val) if v)
            return train, val, "by_file"
    stream = b"".join(d for _, d in docs)
    if len(stream) < 2:
        raise InputError("input has fewer than 2 bytes; cannot make train and val splits")
    num_val = min(len(stream) - 1, max(1, round(len(stream) * val_frac)))
    return stream[:-num_val], stream[-num_val:], "tail_bytes"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        docs = read_documents(collect_files(args.inputs, args.glob))
        train_bytes, val_bytes, method = split_documents(docs, args.val_frac)
        train, val = byte_tokenize(train_bytes), byte_tokenize(val_bytes)
        top = max(int(train.max()), int(val.max()))
        if top >= args.vocab:
            raise InputError(f"input contains byte {top} but --vocab is {args.vocab}")
        write_token_dir(args.out, train, val, args.vocab, {
            "source": f"prepare_data: {len(docs)} files from {' '.join(args.inputs)}",
            "tokenizer": "bytes", "split": method, "val_frac": args.val_frac,
            "num_files": len(docs)})
    except (InputError, DataError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"prepare_data: error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {train.size} train / {val.size} val tokens, vocab {args.vocab}, "
          f"{len(docs)} files, split {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
