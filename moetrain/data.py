"""Token data for moetrain: the embedded stdlib corpus and memmapped token directories.

A *token directory* holds ``train.bin`` and ``val.bin`` (raw little-endian token ids: uint8
when vocab <= 256, uint16 when <= 65536, uint32 when <= 2**32) and ``meta.json``
(format_version, dtype, vocab_size, num_train_tokens, num_val_tokens, source, plus free-form
extras such as "tokenizer": "bytes", or {"kind": "hf", "file": "tokenizer.json", ...} with that
file inside the directory; see moetrain/tokenizer.py). The dtype is a function of vocab_size
alone, so directories written before uint32 existed read unchanged (format_version stays 1).
``tools/prepare_data.py`` writes one, ``data.source: memmap`` reads one, and the embedded corpus
is cached as one. This module never imports the optional readers (moetrain.data_formats,
moetrain.tokenizer, pyarrow, tokenizers): the training path stays free of them.

The embedded corpus is every ``.py`` file of the running Python's standard library, byte
tokenized. Each file's bytes are followed by a single 0 byte (NUL): Python source may not
contain NUL, so it is an unambiguous end-of-document marker the model can learn.

Batches are a pure function of (seed, step, batch_size, seq_len, data). Every rank draws the
same *global* batch and takes its own rows, so the batch sequence never depends on world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moetrain.errors import first_line

if TYPE_CHECKING:  # imported lazily in _gather so tools/prepare_data.py starts without torch
    import torch

FORMAT_VERSION = 1
DOC_SEPARATOR = b"\x00"
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SCAN_CHUNK = 1 << 26  # tokens per chunk when scanning for out-of-vocab ids
MAX_VOCAB = 1 << 32  # uint32 token ids


class DataError(ValueError):
    """One-line, user-facing message naming the file and what is wrong."""


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray  # 1-D memmap, uint8 (vocab <= 256), uint16 (<= 65536) or uint32 (<= 2**32)
    val: np.ndarray  # 1-D memmap, same dtype
    vocab_size: int
    source: str  # human description, e.g. "stdlib:/usr/lib/python3.11 (1790 files)"


def byte_tokenize(text_bytes: bytes) -> np.ndarray:
    """Bytes -> uint8 token ids (a writable copy, so callers may not alias the input)."""
    return np.frombuffer(bytes(text_bytes), dtype=np.uint8).copy()


def _dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token file dtype for a vocabulary: uint8 <= 256 ids, uint16 <= 65536, uint32 <= 2**32."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is outside 1..{MAX_VOCAB} (uint8/uint16/uint32 token files)")
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)



def _max_token(tokens: np.ndarray) -> int:
    """Chunked max so a multi-GB memmap is scanned without one giant temporary."""
    best = -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        best = max(best, int(tokens[start : start + _SCAN_CHUNK].max()))
    return best


# ----------------------------------------------------------------------------- writing


def _write_bin(path: Path, tokens: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())  # the rename that publishes the dir must not outrun the data


def _stage_token_dir(parent: Path, name: str, train: np.ndarray, val: np.ndarray,
                     vocab_size: int, meta_extra: dict | None,
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete token dir under a private temp name in ``parent``; return its path."""
    reserved = {"train.bin", "val.bin", "meta.json"}
    for fname in extra_files or {}:
        if fname in reserved or Path(fname).name != fname or fname.startswith("."):
            raise DataError(f"{name}: extra file name {fname!r} is not a plain, unreserved file name")
    dtype = _dtype_for_vocab(vocab_size)
    arrays = {}
    for split, tokens in (("train", train), ("val", val)):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{name}: {split} tokens must be a 1-D integer array, "
                            f"got {tokens.dtype} shape {tokens.shape}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise DataError(f"{name}: {split} token ids must lie in [0, {vocab_size})")
        arrays[split] = tokens.astype(dtype.newbyteorder("<"), copy=False)
    meta = dict(meta_extra or {})
    meta.update(format_version=FORMAT_VERSION, dtype=dtype.name, vocab_size=vocab_size,
                num_train_tokens=int(arrays["train"].size), num_val_tokens=int(arrays["val"].size))
    meta.setdefault("source", name)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        for split, tokens in arrays.items():
            _write_bin(tmp / f"{split}.bin", tokens)
        for fname, content in (extra_files or {}).items():
            _write_bin(tmp / fname, np.frombuffer(content, dtype=np.uint8))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def write_token_dir(out_dir, train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int,
                    meta_extra: dict | None = None, extra_files: dict[str, bytes] | None = None) -> None:
    """Write a token directory atomically: staged beside ``out_dir``, then renamed into place.

    ``extra_files`` ({plain file name: content}) are written inside it, e.g. the tokenizer file
    that meta.json's "tokenizer" entry names, so the directory is self-contained.

    An existing token directory at ``out_dir`` is replaced (old one moved aside first, then
    deleted), so readers see either the old or the new complete directory, never a mix. A
    non-empty directory without meta.json is refused rather than deleted: it is not ours.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise DataError(f"{out}: exists and is not a token directory (no meta.json); refusing to replace it")
    tmp = _stage_token_dir(out.parent, out.name, train_tokens, val_tokens, vocab_size, meta_extra,
                           extra_files)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- stdlib corpus


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_py_files(root: Path) -> list[tuple[str, int]]:
    """Sorted (posix relative path, size) of the corpus files; installed packages excluded
    because they differ per machine and would make the corpus machine-dependent."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            if fname.endswith(".py") and os.path.isfile(full):
                files.append((Path(full).relative_to(root).as_posix(), os.path.getsize(full)))
    return files


def _is_val_file(rel_posix: str) -> bool:
    """~2% of files go to val, decided by path alone so every machine splits alike."""
    return zlib.crc32(rel_posix.encode("utf-8")) % 100 < 2


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("MOETRAIN_CACHE") or Path.home() / ".cache" / "moetrain"
    return Path(root).expanduser()


def _corpus_dir_name(root: Path, files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}\0{root}\0".encode())
    for rel, size in files:
        h.update(f"{rel}\0{size}\n".encode())
    v = sys.version_info
    return f"stdlib-py{v.major}.{v.minor}.{v.micro}-{h.hexdigest()[:12]}"


def _build_corpus(root: Path, cache_dir: str | None) -> str:
    """Build (or find) the corpus cache for the ``.py`` files under ``root``.

    Concurrent ranks each stage a private temp dir and rename it into place; a rank that
    loses the race discards its copy and uses the winner's identical one.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: stdlib directory not found")
    files = _list_py_files(root)
    if not files:
        raise DataError(f"{root}: no .py files found for the embedded corpus")
    cache = _cache_root(cache_dir)
    final = cache / _corpus_dir_name(root, files)
    if (final / "meta.json").is_file():
        return str(final)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for rel, _ in files:
        try:
            parts[_is_val_file(rel)].append((root / rel).read_bytes() + DOC_SEPARATOR)
        except OSError as e:
            raise DataError(f"{root / rel}: cannot read ({e.strerror})") from None
    source = f"stdlib:{root} ({len(files)} files)"
    try:
        tmp = _stage_token_dir(cache, final.name, byte_tokenize(b"".join(parts[False])),
                               byte_tokenize(b"".join(parts[True])), 256,
                               {"source": source, "num_files": len(files),
                                "num_val_files": len(parts[True]),
                                "separator": "each file followed by one 0 byte"})
    except OSError as e:
        raise DataError(f"{cache}: cannot write corpus cache ({e.strerror}); set $MOETRAIN_CACHE") from None
    try:
        os.rename(tmp, final)  # fails if another process already published a non-empty dir
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():
            raise DataError(f"{final}: cannot publish corpus cache") from None
    return str(final)


def build_stdlib_corpus(cache_dir: str | None = None) -> str:
    """Return the cached embedded-corpus directory, building it on first use (~1-2 s).

    The directory name carries the Python version and a hash of the stdlib path and file list,
    so a different or upgraded interpreter gets its own cache rather than a stale one.
    """
    return _build_corpus(_stdlib_root(), cache_dir)


# ----------------------------------------------------------------------------- loading


def _open_split(directory: Path, split: str, meta: dict, dtype: np.dtype) -> np.ndarray:
    path = directory / f"{split}.bin"
    num_tokens = meta[f"num_{split}_tokens"]
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    size = path.stat().st_size
    if size != num_tokens * dtype.itemsize:
        raise DataError(f"{path}: size {size} bytes != num_{split}_tokens {num_tokens} * "
                        f"{dtype.itemsize} (truncated or corrupt)")
    if num_tokens == 0:
        raise DataError(f"{path}: {split} split is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    if not directory.is_dir():
        raise DataError(f"{directory}: token directory not found")
    if not path.is_file():
        raise DataError(f"{path}: file not found (not a token directory?)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: unknown format_version {meta.get('format_version')!r} "
                        f"(this moetrain reads {FORMAT_VERSION})")
    for key in ("vocab_size", "num_train_tokens", "num_val_tokens"):
        if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise DataError(f"{path}: {key} must be a non-negative integer, got {meta.get(key)!r}")
    return meta


def _load_token_dir(directory: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = _read_meta(directory)
    meta_path = directory / "meta.json"
    data_vocab = meta["vocab_size"]
    try:
        expected = _dtype_for_vocab(data_vocab)
    except DataError as e:
        raise DataError(f"{meta_path}: {e}") from None
    if meta.get("dtype") != expected.name:
        raise DataError(f"{meta_path}: dtype {meta.get('dtype')!r} does not match vocab_size "
                        f"{data_vocab} (expected {expected.name!r})")
    if data_vocab > vocab_size:
        raise DataError(f"{meta_path}: data has vocab {data_vocab} but model.vocab_size is {vocab_size}; "
                        f"set model.vocab_size={data_vocab} (or larger)")
    dtype = expected.newbyteorder("<")
    splits = [_open_split(directory, s, meta, dtype) for s in ("train", "val")]
    for split, tokens in zip(("train", "val"), splits):
        if data_vocab < np.iinfo(dtype).max + 1 and (top := _max_token(tokens)) >= data_vocab:
            raise DataError(f"{directory / (split + '.bin')}: token id {top} >= vocab_size {data_vocab}")
    return splits[0], splits[1], meta


def load_token_data(source: str, path: str | None, vocab_size: int,
                    cache_dir: str | None = None) -> TokenData:
    """Open and validate token data for a model with ``vocab_size`` ids.

    ``source="stdlib"`` builds/opens the embedded corpus (``path`` is ignored);
    ``source="memmap"`` opens a directory written by ``tools/prepare_data.py``. Every problem
    is a one-line DataError naming the offending file, raised before any training starts.
    """
    if source == "stdlib":
        directory = Path(build_stdlib_corpus(cache_dir))
    elif source == "memmap":
        if not path:
            raise DataError("data.path is required when data.source is 'memmap'")
        directory = Path(path).expanduser()
    else:
        raise DataError(f"data.source {source!r} is unknown (allowed: 'stdlib', 'memmap')")
    train, val, meta = _load_token_dir(directory, vocab_size)
    desc = str(meta.get("source", ""))
    if source == "memmap":
        desc = f"memmap:{directory}" + (f" ({desc})" if desc else "")
    return TokenData(train=train, val=val, vocab_size=meta["vocab_size"], source=desc)


# ----------------------------------------------------------------------------- batching


def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    """Return the largest valid window start; DataError if no window of seq_len+1 fits."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    max_start = len(tokens) - seq_len - 1
    if max_start < 0:
        name = getattr(tokens, "filename", None) or "token array"
        raise DataError(f"{name}: {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    return max_start


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    import torch

    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def sample_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """The global training batch for ``step``: LongTensor [batch_size, seq_len + 1].

    Start offsets are uniform in [0, len - seq_len - 1] from a generator keyed on (seed, step)
    alone, so any step can be regenerated after resume and every rank sees the same batch
    whatever the world size; ranks slice their rows from it.
    """
    max_start = _check_window(tokens, batch_size, seq_len)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")
    starts = np.random.default_rng([seed, step]).integers(0, max_start + 1, size=batch_size)
    return _gather(tokens, starts.astype(np.int64), seq_len)


def eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Fixed validation batches: num_batches * batch_size windows evenly spaced over ``tokens``.

    No randomness, so val loss is comparable across runs, resumes and layouts. A split too
    short for that many distinct windows repeats windows rather than failing.
    """
    max_start = _check_window(tokens, batch_size, seq_len)
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    starts = np.linspace(0, max_start, num_batches * batch_size).round().astype(np.int64)
    return [_gather(tokens, s, seq_len) for s in starts.reshape(num_batches, batch_size)]
