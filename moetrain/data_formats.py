"""Readers for tools/prepare_data.py's inputs: find the files, read them bounded, parse each format.

Pure numpy and the standard library; pyarrow is imported inside the Parquet reader only. Every
problem is an InputError whose message is one line naming the file and what is wrong, raised
before anything is written. Formats (``FORMATS``), chosen by ``--format`` or by extension
(``detect_format``):

  text      any other file, or a directory walked recursively (the default): one document per
            file, its bytes as they are.
  jsonl     JSON Lines (``.jsonl``): one JSON object per line, one document per line, its text
            in a string field (``--field``, default "text"). Blank lines are skipped; a null field
            is skipped with one warning per file; an invalid line (also one nested too deeply or
            with an integer literal too long to convert), a non-object, a missing field or a
            non-string value is an error naming the line. Each record comes with its 0-based line
            index (blank lines count), its split key.
  parquet   Apache Parquet (``.parquet``), read with pyarrow: one document per row of a string
            column (``--field``). A file with no rows, no such column or a non-string column is an
            error; null values are skipped with one warning per file. Each record comes with its
            0-based row index (null rows count). The column's uncompressed size, from the file's
            metadata, is checked against the size limit before the column is decompressed.
  nanogpt   a flat binary of little-endian token ids (nanoGPT's ``train.bin``/``val.bin``),
            dtype given by ``--dtype uint16|uint32`` (nothing in the file says which). No document
            boundaries: nanoGPT's prepare scripts already put an end-of-text token after each
            document. The size must be a multiple of the dtype's size.
  megatron  Megatron-LM's indexed dataset (MMapIndexedDataset): ``PREFIX.idx`` + ``PREFIX.bin``.
            ``.idx``, all integers little-endian:
                9 bytes magic b"MMIDIDX\\x00\\x00", uint64 version = 1, uint8 dtype code
                (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16),
                uint64 sequence count S, uint64 document count D,
                int32 sizes[S] (tokens per sequence), int64 pointers[S] (byte offset of each
                sequence in .bin), int64 document_indices[D] (sequence index where each document
                starts, first 0, last S: documents = D - 1), then optionally int8 modes[S]
                (multimodal datasets).
            ``.bin``: the sequences' token ids in that dtype. A document is the concatenation of
            its sequences. Float dtypes are refused; every size, pointer and index is checked
            against both files (a truncated .idx or .bin is an error naming it), and the sizes
            must add up to no more than the .bin holds (sequences that overlap could otherwise
            copy the .bin many times over, past the size limits).

Hostile inputs (files found by ``collect_files``): only regular files are read. Inside a
directory anything else (FIFO, socket, device, a symlink to one, a dangling symlink) is skipped
with one warning each; a symlinked directory is not followed; a symlink to a regular file is
read. A named input that is not a regular file or directory is an error. Files are opened
non-blocking and re-checked with fstat, and reads are bounded by ``max_file`` per file and
``max_total`` over all inputs, checked from stat before reading and again while reading.
"""
from __future__ import annotations

import fnmatch
import json
import os
import stat
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from moetrain.errors import first_line

FORMATS = ("text", "jsonl", "parquet", "nanogpt", "megatron")
TOKEN_FORMATS = ("nanogpt", "megatron")  # already tokenized: ids, no text
MIB = 1 << 20

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
# Megatron's DType codes; the float ones are refused (token ids are integers)
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                   7: np.float32, 8: np.uint16}
_MEGATRON_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents

Warn = Callable[[str], None]


class InputError(Exception):
    """A user-facing problem with the inputs; reported as one line, exit code 2."""


def _no_warn(msg: str) -> None:
    pass


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def size_text(n: int) -> str:
    return (f"{n} byte" + "s" * (n != 1)) if n < MIB else f"{n / MIB:.1f} MiB"


# ----------------------------------------------------------------------------- finding files


def _stat(path: Path, named: bool, warn: Warn) -> os.stat_result | None:
    """stat() following symlinks; None (after a warning) for a dangling symlink in a directory."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if not named and os.path.islink(path):
            warn(f"skipping {path}: dangling symlink")
            return None
        raise InputError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise InputError(f"{path}: cannot stat ({e.strerror})") from None


def collect_files(inputs: Iterable[str], pattern: str, warn: Warn = _no_warn) -> list[tuple[str, Path, int]]:
    """(split key, path, size) per regular input file, directories walked in sorted order (hidden
    entries skipped, ``pattern`` matched against file names inside directories). The key is the
    path relative to its input argument. Nothing is opened here: FIFOs, sockets and devices are
    recognised by stat alone."""
    inputs = list(inputs)
    found = []
    for arg in inputs:
        root = Path(arg)
        st = _stat(root, named=True, warn=warn)
        if stat.S_ISREG(st.st_mode):
            found.append((root.name, root, st.st_size))
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(root):
                keep = []
                for d in sorted(dirnames):
                    if d.startswith("."):
                        continue
                    if os.path.islink(os.path.join(dirpath, d)):
                        warn(f"skipping {Path(dirpath) / d}: symlinked directory (not followed)")
                        continue
                    keep.append(d)
                dirnames[:] = keep
                for name in sorted(filenames):
                    if name.startswith(".") or not fnmatch.fnmatch(name, pattern):
                        continue
                    path = Path(dirpath) / name
                    st = _stat(path, named=False, warn=warn)
                    if st is None:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        link = " (symlink target)" if os.path.islink(path) else ""
                        warn(f"skipping {path}: {_kind(st.st_mode)}{link}, not a regular file")
                        continue
                    found.append((path.relative_to(root).as_posix(), path, st.st_size))
        else:
            raise InputError(f"{arg}: {_kind(st.st_mode)}, not a regular file or directory")
    if not found:
        raise InputError(f"no input files found in {' '.join(inputs)} (glob {pattern!r})")
    return found


def megatron_files(inputs: Iterable[str], warn: Warn = _no_warn) -> list[tuple[str, Path, int]]:
    """Each Megatron dataset as two entries, its .idx then its .bin. An input may be the prefix,
    PREFIX.idx, PREFIX.bin, or a directory (every ``*.idx`` under it, each with its ``.bin``)."""
    named = []
    for arg in inputs:
        p = Path(arg)
        if p.suffix in (".idx", ".bin") and not p.is_dir():
            p = p.with_suffix(".idx")
        elif not p.exists() and Path(f"{arg}.idx").exists():
            p = Path(f"{arg}.idx")
        named.append(str(p))
    files = []
    for key, idx, size in collect_files(named, "*.idx", warn):
        if idx.suffix != ".idx":
            raise InputError(f"{idx}: not a Megatron index (.idx) file")
        bin_path = idx.with_suffix(".bin")
        st = _stat(bin_path, named=True, warn=warn)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{bin_path}: {_kind(st.st_mode)}, not a regular file")
        stem = key[: -len(".idx")]
        files += [(stem + ".idx", idx, size), (stem + ".bin", bin_path, st.st_size)]
    return files


def detect_format(inputs: Iterable[str]) -> str:
    """The format named by the inputs' extensions; directories and other extensions are text,
    except a bare Megatron prefix (no such file, but PREFIX.idx exists). Inputs of different
    formats are an error (pass --format)."""
    kinds = {}
    for arg in inputs:
        p = Path(arg)
        ext = p.suffix.lower() if not p.is_dir() else ""
        if not p.exists() and Path(f"{arg}.idx").is_file():
            kind = "megatron"
        elif ext == ".jsonl":
            kind = "jsonl"
        elif ext == ".parquet":
            kind = "parquet"
        elif ext == ".idx" or (ext == ".bin" and p.with_suffix(".idx").exists()):
            kind = "megatron"
        elif ext == ".bin":
            kind = "nanogpt"
        else:
            kind = "text"
        kinds.setdefault(kind, arg)
    if len(kinds) > 1:
        desc = ", ".join(f"{a} is {k}" for k, a in kinds.items())
        raise InputError(f"inputs mix formats ({desc}); pass --format")
    return next(iter(kinds), "text")


# ----------------------------------------------------------------------------- bounded reading


def check_sizes(files: list[tuple[str, Path, int]], max_file: int, max_total: int) -> None:
    """Refuse before reading anything: one line naming the first file over a limit."""
    total = 0
    for _, path, size in files:
        if size > max_file:
            raise InputError(f"{path}: {size_text(size)}, over the --max-file-mb limit ({size_text(max_file)}); "
                             "raise the limit or leave the file out")
        total += size
        if total > max_total:
            raise InputError(f"inputs exceed the --max-total-mb limit ({size_text(max_total)}) at {path} "
                             f"({size_text(total)} so far); raise the limit or pass fewer files")


def read_regular(path: Path, limit: int, follow_symlinks: bool = True) -> bytes:
    """At most limit+1 bytes of a regular file. O_NONBLOCK: should the file have been replaced by
    a FIFO since the scan, open() returns at once and fstat refuses it (no hang); O_NOCTTY: a
    terminal never becomes our controlling one; follow_symlinks=False adds O_NOFOLLOW (a symlink
    fails to open)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
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


def read_files(files: list[tuple[str, Path, int]], max_file: int, max_total: int) -> list[bytes]:
    """Every file's content (aligned with ``files``), within the limits (see check_sizes)."""
    check_sizes(files, max_file, max_total)
    contents = []
    total = 0
    for _, path, _ in files:
        data = read_regular(path, max_file)
        if len(data) > max_file:           # grew since stat, or a size-0 /proc-like file
            raise InputError(f"{path}: over the --max-file-mb limit ({size_text(max_file)}) when read; "
                             "raise the limit or leave the file out")
        total += len(data)
        if total > max_total:
            raise InputError(f"inputs exceed the --max-total-mb limit ({size_text(max_total)}) at {path} "
                             f"when read ({size_text(total)} so far); raise the limit or pass fewer files")
        contents.append(data)
    return contents


# ----------------------------------------------------------------------------- text records


def parse_jsonl(path: Path, data: bytes, field: str, warn: Warn = _no_warn) -> list[tuple[int, str]]:
    """(0-based line index, ``field`` string) of every record of a JSON Lines file (see the module
    docstring)."""
    texts = []
    nulls = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {lineno}: invalid JSON (column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise InputError(f"{path}: line {lineno}: invalid JSON (nested too deeply)") from None
        except ValueError as e:   # e.g. an integer literal over Python's int_max_str_digits
            raise InputError(f"{path}: line {lineno}: invalid JSON ({first_line(e)})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            fields = ", ".join(sorted(record)[:8]) or "none"
            raise InputError(f"{path}: line {lineno}: no field {field!r} (fields: {fields}); pick one with --field")
        value = record[field]
        if value is None:
            nulls += 1
            continue
        if not isinstance(value, str):
            raise InputError(f"{path}: line {lineno}: field {field!r} is {type(value).__name__}, not a string")
        texts.append((lineno - 1, value))
    if nulls:
        warn(f"{path}: skipped {nulls} record(s) whose {field!r} is null")
    return texts


def parse_parquet(path: Path, data: bytes, field: str, warn: Warn = _no_warn,
                  max_bytes: int | None = None) -> list[tuple[int, str]]:
    """(0-based row index, string) of every non-null value of the ``field`` column of a Parquet
    file (see the module docstring); refused when the column's uncompressed size (per the file's
    metadata) is over ``max_bytes``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install -e .[hf])") from None
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        schema = pf.schema_arrow
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if field not in schema.names:
        cols = ", ".join(schema.names[:8]) or "none"
        raise InputError(f"{path}: no column {field!r} (columns: {cols}); pick one with --field")
    ftype = schema.field(field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
            or getattr(pa.types, "is_string_view", lambda t: False)(ftype)):
        raise InputError(f"{path}: column {field!r} has type {ftype}, not string")
    if pf.metadata.num_rows == 0:
        raise InputError(f"{path}: empty Parquet file (0 rows)")
    if max_bytes is not None:
        try:
            meta = pf.metadata
            col = schema.get_field_index(field)
            size = sum(max(0, meta.row_group(g).column(col).total_uncompressed_size)
                       for g in range(meta.num_row_groups))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
        if size > max_bytes:
            raise InputError(f"{path}: column {field!r} is {size_text(size)} uncompressed, over the "
                             f"--max-file-mb/--max-total-mb limit ({size_text(max_bytes)}); "
                             "raise the limit or leave the file out")
    try:
        column = pf.read(columns=[field]).column(field)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read column {field!r} ({first_line(e)})") from None
    values = column.to_pylist()
    texts = [(row, v) for row, v in enumerate(values) if v is not None]
    if len(texts) < len(values):
        warn(f"{path}: skipped {len(values) - len(texts)} row(s) whose {field!r} is null")
    return texts


# ----------------------------------------------------------------------------- token corpora


def parse_nanogpt(path: Path, data: bytes, dtype: str) -> np.ndarray:
    """A flat binary of little-endian ``dtype`` token ids (uint16 or uint32)."""
    dt = np.dtype(dtype).newbyteorder("<")
    if len(data) % dt.itemsize:
        raise InputError(f"{path}: {size_text(len(data))} is not a multiple of {dt.itemsize} "
                         f"({dt.name} tokens): truncated, or not --dtype {dt.name}")
    if not data:
        raise InputError(f"{path}: no tokens (empty file)")
    return np.frombuffer(data, dtype=dt)


def parse_megatron(idx_path: Path, idx: bytes, bin_path: Path, bin_data: bytes) -> list[np.ndarray]:
    """The documents of a Megatron-LM indexed dataset, each a 1-D array of its token ids."""
    if len(idx) < _MEGATRON_HEAD.size:
        raise InputError(f"{idx_path}: truncated: {size_text(len(idx))}, shorter than the "
                         f"{_MEGATRON_HEAD.size}-byte header")
    magic, version, code, n_seq, n_doc = _MEGATRON_HEAD.unpack_from(idx)
    if magic != MEGATRON_MAGIC:
        raise InputError(f"{idx_path}: bad magic {magic!r}, not a Megatron indexed dataset "
                         f"(expected {MEGATRON_MAGIC!r})")
    if version != MEGATRON_VERSION:
        raise InputError(f"{idx_path}: index version {version}, this reader knows {MEGATRON_VERSION}")
    if code not in MEGATRON_DTYPES:
        raise InputError(f"{idx_path}: unknown dtype code {code}")
    dtype = np.dtype(MEGATRON_DTYPES[code]).newbyteorder("<")
    if dtype.kind == "f":
        raise InputError(f"{idx_path}: dtype {dtype.name} (code {code}) is not an integer token type")
    need = _MEGATRON_HEAD.size + n_seq * (4 + 8) + n_doc * 8
    if len(idx) < need:
        raise InputError(f"{idx_path}: truncated: {size_text(len(idx))}, its header's counts "
                         f"({n_seq} sequences, {n_doc} document indices) need {need} bytes")
    if len(idx) not in (need, need + n_seq):   # + int8 modes for multimodal datasets
        raise InputError(f"{idx_path}: {len(idx)} bytes, expected {need} (or {need + n_seq} with modes) "
                         "for its header's counts: corrupt, or not a version-1 index")
    off = _MEGATRON_HEAD.size
    sizes = np.frombuffer(idx, dtype="<i4", count=n_seq, offset=off).astype(np.int64)
    pointers = np.frombuffer(idx, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
    doc_idx = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
    if n_seq and int(sizes.min()) < 0:
        raise InputError(f"{idx_path}: negative sequence size {int(sizes.min())}")
    if n_doc < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise InputError(f"{idx_path}: document indices must rise from 0 to the sequence count {n_seq}")
    if n_seq and (int(pointers.min()) < 0 or np.any(pointers % dtype.itemsize)):
        raise InputError(f"{idx_path}: sequence pointers must be non-negative multiples of {dtype.itemsize}")
    if n_seq and int(pointers.max()) > len(bin_data):   # checked first: pointer + size cannot overflow
        raise InputError(f"{bin_path}: truncated: {size_text(len(bin_data))}, but {idx_path.name} points "
                         f"to byte {int(pointers.max())}")
    ends = pointers + sizes * dtype.itemsize
    if n_seq and int(ends.max()) > len(bin_data):
        raise InputError(f"{bin_path}: truncated: {size_text(len(bin_data))}, but {idx_path.name} points "
                         f"to byte {int(ends.max())}")
    total = int(sizes.sum()) * dtype.itemsize   # int64 sum of int32 sizes: no overflow below 2**32 sequences
    if total > len(bin_data):
        raise InputError(f"{idx_path}: its sequences hold {size_text(total)} of tokens, more than "
                         f"{bin_path.name}'s {size_text(len(bin_data))} (overlapping or corrupt sequences)")
    if len(bin_data) % dtype.itemsize:
        raise InputError(f"{bin_path}: {size_text(len(bin_data))} is not a multiple of {dtype.itemsize} "
                         f"({dtype.name} tokens, per {idx_path.name}): truncated or mismatched")
    tokens = np.frombuffer(bin_data, dtype=dtype)
    contiguous = n_seq == 0 or (pointers[0] == 0 and np.array_equal(pointers[1:], ends[:-1]))
    if contiguous:   # the layout Megatron writes: one slice per document, no copy per sequence
        seq_starts = np.concatenate([[0], np.cumsum(sizes)])
        bounds = seq_starts[doc_idx]
        return [tokens[bounds[i]:bounds[i + 1]] for i in range(n_doc - 1)]
    starts = pointers // dtype.itemsize
    docs = []
    for d in range(n_doc - 1):
        lo, hi = int(doc_idx[d]), int(doc_idx[d + 1])
        parts = [tokens[starts[s]:starts[s] + sizes[s]] for s in range(lo, hi)]
        docs.append(np.concatenate(parts) if parts else tokens[:0])
    return docs


def check_token_range(path: Path, tokens: np.ndarray, vocab: int, hint: str) -> None:
    """Every id in [0, vocab), else one line naming the file, the first bad id and ``hint``."""
    if not tokens.size:
        return
    bad = (tokens < 0) | (tokens >= vocab) if tokens.dtype.kind == "i" else tokens >= vocab
    if bad.any():
        pos = int(np.argmax(bad))
        raise InputError(f"{path}: token id {int(tokens[pos])} at position {pos} is outside the "
                         f"vocabulary 0..{vocab - 1} ({hint})")
