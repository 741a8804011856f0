"""On-disk layout of a moetrain checkpoint and the file-level operations that keep it consistent.

    <checkpoint.dir>/
      latest                  "step_00000020\\n": a pointer for people and tools, rewritten last
      step_00000020/          one complete checkpoint, torch.distributed.checkpoint (DCP) format
        .metadata             DCP: every key's shape/dtype and the file/offset/length holding it
        __0_0.distcp ...      DCP data: one file per rank that had something to write
        manifest.json         written LAST, by rank 0: files + sizes + CRC-32s, step, layout, config
      .tmp-step_00000030/     a save in progress (a crash leaves it; the next start removes it)

A directory counts as a checkpoint only when manifest.json exists, every file it lists has the
recorded size, and every DCP chunk lies inside its file. Before a checkpoint is loaded (and by
`tools/ckpt_inspect.py --verify`) every file's CRC-32 is compared with the manifest's, so a
flipped bit is an error naming the file instead of silently wrong weights (checkpoints written
before CRCs were recorded are checked for size only). Rank 0 writes the manifest after DCP's
finish step (which runs after every rank's writes returned), renames the directory into place,
then rewrites `latest`. A crash before the rename leaves only a .tmp- directory; a crash after
it leaves a complete step_ directory, which `resume: auto` finds because it scans step numbers
rather than trusting `latest`.

Nothing here runs a collective except save_dcp/load_dcp, which DCP makes failure-safe: an
exception on any rank is gathered and re-raised on every rank.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

FORMAT = "moetrain-dcp"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
DCP_METADATA = ".metadata"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_STALE_RE = re.compile(r"^\.(tmp|old)-step_\d{8,}$")      # only our own names: never a user's file
CRASH_ENV = "MOETRAIN_CKPT_CRASH"     # test hook: "<phase>[@<step>]", see crash_point()
CRASH_EXIT_CODE = 86


# DCP warns that it runs in one process (we ask it to, at world 1; async writes warn from their
# own thread, so a scoped catch_warnings cannot hide it) and that it overwrites a directory (only
# ever our own .tmp- directory). Neither tells a user anything.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint in .*overwriting.*")


class CheckpointError(RuntimeError):
    """One line naming the checkpoint (or file) and what is wrong with it."""


@dataclass
class CheckpointInfo:
    path: str
    step: int
    manifest: dict
    metadata: Any            # torch.distributed.checkpoint.metadata.Metadata


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> Optional[int]:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def list_step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every step_* directory under root, newest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        step = parse_step(name)
        if step is not None and os.path.isdir(os.path.join(root, name)):
            out.append((step, os.path.join(root, name)))
    return sorted(out, reverse=True)


def read_metadata(path: str):
    """DCP's global metadata (no collective). Raises CheckpointError naming .metadata."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: file {DCP_METADATA} cannot be read "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


def verify(path: str) -> CheckpointInfo:
    """File-level completeness check of one checkpoint directory; no collective, no tensor reads."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a file, not a checkpoint directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        if os.path.isfile(os.path.join(path, DCP_METADATA)):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing, so the save never "
                                  "completed (or the file was deleted); refusing to load it")
        raise CheckpointError(f"checkpoint {path}: not a moetrain checkpoint (no {MANIFEST}, "
                              f"no {DCP_METADATA}; it holds {_describe_dir(path)})")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} is corrupt "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {version!r} is newer than this "
                              f"moetrain reads ({FORMAT_VERSION}); upgrade moetrain")
    files = manifest.get("files")
    if not isinstance(files, dict) or DCP_METADATA not in files or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} lacks 'files' (with {DCP_METADATA}) "
                              "or 'step'")
    for rel, size in sorted(files.items()):
        fpath = os.path.join(path, rel)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: file {rel} listed in {MANIFEST} is missing")
        actual = os.path.getsize(fpath)
        if actual != size:
            what = "truncated" if actual < size else "larger than recorded"
            raise CheckpointError(f"checkpoint {path}: file {rel} is {what} ({actual} bytes, "
                                  f"{MANIFEST} records {size})")
    metadata = read_metadata(path)
    _check_chunks(path, metadata, files)
    return CheckpointInfo(path, manifest["step"], manifest, metadata)


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def check_contents(info: CheckpointInfo) -> None:
    """Every file's CRC-32 equals the manifest's (reads every byte; no-op for manifests without)."""
    crcs = info.manifest.get("crc32")
    if not isinstance(crcs, dict):
        return
    for rel, want in sorted(crcs.items()):
        fpath = os.path.join(info.path, rel)
        try:
            got = file_crc32(fpath)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {info.path}: file {rel} cannot be read "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from None
        if got != want:
            raise CheckpointError(f"checkpoint {info.path}: file {rel} is corrupt (CRC-32 {got:08x}, "
                                  f"{MANIFEST} records {want:08x})")


def _check_chunks(path: str, metadata, sizes: dict[str, int]) -> None:
    """Every chunk DCP will read lies inside a file the manifest (or the directory) vouches for."""
    for index, info in (metadata.storage_data or {}).items():
        rel = info.relative_path
        size = sizes.get(rel)
        if size is None:
            fpath = os.path.join(path, rel)
            size = os.path.getsize(fpath) if os.path.isfile(fpath) else None
        if size is None:
            raise CheckpointError(f"checkpoint {path}: shard file {rel} (holding {index.fqn}) is missing")
        if info.offset + info.length > size:
            raise CheckpointError(f"checkpoint {path}: shard file {rel} is truncated: {index.fqn} needs "
                                  f"bytes up to {info.offset + info.length}, the file has {size}")


def find_complete(root: str) -> tuple[list[CheckpointInfo], list[str]]:
    """Complete checkpoints under root, newest first, and one warning line per skipped step_ dir."""
    good, warnings = [], []
    for _, path in list_step_dirs(root):
        try:
            good.append(verify(path))
        except CheckpointError as exc:
            warnings.append(f"skipping incomplete or corrupt checkpoint: {exc}")
    return good, warnings


def resolve_path(path: str) -> tuple[list[CheckpointInfo], list[str]]:
    """checkpoint.resume=<path>: a step directory, a checkpoint.dir (newest complete inside), or
    a checkpoint.dir's `latest` file (the step directory it names)."""
    if os.path.basename(path.rstrip("/")) == LATEST and os.path.isfile(path):
        named = read_latest(os.path.dirname(os.path.abspath(path)))
        if not named:
            raise CheckpointError(f"checkpoint pointer {path}: does not name a step_* directory")
        path = named
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)) and list_step_dirs(path):
        good, warnings = find_complete(path)
        if not good:
            raise CheckpointError(f"checkpoint directory {path}: none of its step_* checkpoints is "
                                  f"complete ({warnings[0].split(': ', 1)[1]})")
        return good, warnings
    return [verify(path)], []


def remove_stale(root: str) -> list[str]:
    """Delete the leftovers of interrupted saves (.tmp-step_N, .old-step_N, latest.tmp; nothing
    else, whatever its name). Only rank 0 calls this, and only while no save is in flight."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        if _STALE_RE.match(name) or name == LATEST + ".tmp":
            full = os.path.join(root, name)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            removed.append(name)
    return removed


def tmp_dir_for(root: str, step: int) -> str:
    return os.path.join(root, TMP_PREFIX + step_dirname(step))


# ----------------------------------------------------------------------------- DCP I/O


def save_dcp(flat: dict, path: str, group, async_save: bool = False):
    """Every rank writes its share of `flat` into `path`. Returns a Future when async_save."""
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True, overwrite=True)
    kwargs = dict(storage_writer=writer, process_group=group, no_dist=group is None)
    try:
        if async_save:
            return dcp.async_save(flat, **kwargs)
        dcp.save(flat, **kwargs)
        return None
    except CheckpointException as exc:
        raise CheckpointError(f"saving checkpoint {path} failed: {describe_dcp_error(exc)}") from None


def load_dcp(flat: dict, path: str, group) -> None:
    """Fill `flat` (tensors in place; bytes values replaced) from the checkpoint at `path`."""
    try:
        dcp.load(flat, storage_reader=dcp.FileSystemReader(path), process_group=group, no_dist=group is None)
    except CheckpointException as exc:
        raise CheckpointError(f"checkpoint {path}: reading failed: {describe_dcp_error(exc)}") from None


def describe_dcp_error(exc: BaseException) -> str:
    """CheckpointException carries one (exception, traceback) per failed rank: keep one line."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return _first_line(exc)
    rank = min(failures)
    inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
    return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"


# ----------------------------------------------------------------------------- commit


def crash_point(phase: str, step: int) -> None:
    """Test hook for crash safety: MOETRAIN_CKPT_CRASH=<phase>[@<step>] ends the process right here.
    Phases, in order: written (DCP files done, no manifest), manifest (manifest written, not
    renamed), renamed (step_ dir in place, `latest` not yet updated)."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return
    want, _, at = spec.partition("@")
    if want == phase and (not at or int(at) == step):
        os._exit(CRASH_EXIT_CODE)


def commit(tmp: str, root: str, step: int, fields: dict) -> str:
    """Rank 0, after every rank's DCP writes finished: verify the files, write the manifest, rename
    tmp -> step_NNNNNNNN, rewrite `latest`. Returns the final path."""
    metadata = read_metadata(tmp)
    sizes = {}
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, tmp)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    _check_chunks(tmp, metadata, sizes)
    crash_point("written", step)
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, step=step, created=time.time(), **fields)
    manifest["files"] = dict(sorted(sizes.items()))
    manifest["crc32"] = {rel: file_crc32(os.path.join(tmp, rel)) for rel in sorted(sizes)}
    _write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    crash_point("manifest", step)
    final = os.path.join(root, step_dirname(step))
    old = None
    if os.path.exists(final):        # re-saving a step (a restart after a crash past it): swap, then delete
        old = os.path.join(root, OLD_PREFIX + step_dirname(step))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    crash_point("renamed", step)
    _write_atomic(os.path.join(root, LATEST), step_dirname(step) + "\n")
    return final


def prune(root: str, keep_last: int, newest_step: int) -> list[str]:
    """Delete complete checkpoints older than the keep_last newest ones at or below newest_step.
    Checkpoints newer than newest_step and directories that do not verify are left alone, so the
    only complete checkpoint is never deleted (the one just committed is always kept)."""
    complete = []
    for step, path in list_step_dirs(root):
        if step > newest_step:
            continue
        try:
            verify(path)
        except CheckpointError:
            continue
        complete.append(path)
    removed = []
    for path in complete[max(1, keep_last):]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def read_latest(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(root, name) if parse_step(name) is not None else None


def _write_atomic(path: str, text: str) -> None:
    part = path + ".tmp"
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe_dir(path: str) -> str:
    names = sorted(os.listdir(path))
    if not names:
        return "nothing"
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} entries)" if len(names) > 3 else "")
    return shown


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
