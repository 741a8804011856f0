#!/usr/bin/env python3
"""Turn text files into a moetrain token directory (train.bin, val.bin, meta.json).

Read by ``data.source: memmap`` with ``data.path: DIR``. Tokenization is byte-level (one
token per byte, ids 0..255), the default and, for now, only tokenizer. Each file's bytes are
followed by one 0 byte as an end-of-document marker, as in the embedded stdlib corpus.

Split: with several files, a file goes to val when
``zlib.crc32(relative_posix_path) % 10000 < round(val_frac * 10000)``, so the split depends
only on file names and is stable as files are added. With a single file, or when the by-file
split would leave either side empty, the last ``val_frac`` of the concatenated bytes is val.

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
regular files, e.g. under /proc, report size 0). The tool holds about 4x the input in memory.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import stat
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


from moetrain.data import DOC_SEPARATOR, DataError, byte_tokenize, write_token_dir  # noqa: E402


MIB = 1 << 20
DEFAULT_MAX_FILE_MB = 1024
DEFAULT_MAX_TOTAL_MB = 4096


class InputError(Exception):
    """A user-facing problem with the inputs; reported as one line, exit code 2."""


def _warn(msg: str) -> None:
    print(f"prepare_data: warning: {msg}", file=sys.stderr, flush=True)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return (f"{n} byte" + "s" * (n != 1)) if n < MIB else f"{n / MIB:.1f} MiB"


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
    if not 1 <= args.vocab <= 65536:
        p.error(f"--vocab must be in 1..65536, got {args.vocab}")
    return args


def _stat(path: Path, named: bool) -> os.stat_result | None:
    """stat() following symlinks; None (after a warning) for a dangling symlink in a directory."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if not named and os.path.islink(path):
            _warn(f"skipping {path}: dangling symlink")
            return None
        raise InputError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise InputError(f"{path}: cannot stat ({e.strerror})") from None


def collect_files(inputs: list[str], pattern: str) -> list[tuple[str, Path, int]]:
    """(split key, path, size) per regular input file; the key is the path relative to its input
    argument. Nothing is opened here: FIFOs, sockets and devices are recognised by stat alone."""
    found = []
    for arg in inputs:
        root = Path(arg)
        st = _stat(root, named=True)
        if stat.S_ISREG(st.st_mode):
            found.append((root.name, root, st.st_size))
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(root):
                keep = []
                for d in sorted(dirnames):
                    if d.startswith("."):
                        continue
                    if os.path.islink(os.path.join(dirpath, d)):
                        _warn(f"skipping {Path(dirpath) / d}: symlinked directory (not followed)")
                        continue
                    keep.append(d)
                dirnames[:] = keep
                for name in sorted(filenames):
                    if name.startswith(".") or not fnmatch.fnmatch(name, pattern):
                        continue
                    path = Path(dirpath) / name
                    st = _stat(path, named=False)
                    if st is None:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        link = " (symlink target)" if os.path.islink(path) else ""
                        _warn(f"skipping {path}: {_kind(st.st_mode)}{link}, not a regular file")
                        continue
                    found.append((path.relative_to(root).as_posix(), path, st.st_size))
        else:
            raise InputError(f"{arg}: {_kind(st.st_mode)}, not a regular file or directory")
    if not found:
        raise InputError(f"no input files found in {' '.join(inputs)} (glob {pattern!r})")
    return found


def check_sizes(files: list[tuple[str, Path, int]], max_file: int, max_total: int) -> None:
    """Refuse before reading anything: one line naming the first file over a limit."""
    total = 0
    for _, path, size in files:
        if size > max_file:
            raise InputError(f"{path}: {_size(size)}, over the --max-file-mb limit ({_size(max_file)}); "
                             "raise the limit or leave the file out")
        total += size
        if total > max_total:
            raise InputError(f"inputs exceed the --max-total-mb limit ({_size(max_total)}) at {path} "
                             f"({_size(total)} so far); raise the limit or pass fewer files")


def _read_regular(path: Path, limit: int) -> bytes:
    """At most limit+1 bytes of a regular file. O_NONBLOCK: should the file have been replaced by
    a FIFO since the scan, open() returns at once and fstat refuses it (no hang); O_NOCTTY: a
    terminal never becomes our controlling one."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: {_kind(mode)}, not a regular file (it changed while scanning)")
        try:
            return f.read(limit + 1)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None


def read_documents(files: list[tuple[str, Path, int]], max_file: int = DEFAULT_MAX_FILE_MB * MIB,
                   max_total: int = DEFAULT_MAX_TOTAL_MB * MIB) -> list[tuple[str, bytes]]:
    check_sizes(files, max_file, max_total)
    docs = []
    total = 0
    for key, path, _ in files:
        data = _read_regular(path, max_file)
        if len(data) > max_file:           # grew since stat, or a size-0 /proc-like file
            raise InputError(f"{path}: over the --max-file-mb limit ({_size(max_file)}) when read; "
                             "raise the limit or leave the file out")
        total += len(data)
        if total > max_total:
            raise InputError(f"inputs exceed the --max-total-mb limit ({_size(max_total)}) at {path} "
                             f"when read ({_size(total)} so far); raise the limit or pass fewer files")
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
        docs = read_documents(collect_files(args.inputs, args.glob),
                              int(args.max_file_mb * MIB), int(args.max_total_mb * MIB))
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
