"""On-disk layout of a moetrain checkpoint and the file-level operations that keep it consistent.

    <checkpoint.dir>/
      latest                  "step_00000020\\n": a pointer for people and tools, rewritten last
      step_00000020/          one complete checkpoint, torch.distributed.checkpoint (DCP) format
        .metadata             DCP: every key's shape/dtype and the file/offset/length holding it
        __0_0.distcp ...      DCP data: one file per rank that had something to write
        manifest.json         written LAST, by rank 0: files + sizes + CRC-32s, step, layout, config
      .tmp-step_00000030/     a save in progress (a crash leaves it; the next start removes it)

A directory counts as a checkpoint only when manifest.json exists, every file it lists has the
recorded size, `.metadata` has its recorded CRC-32 and parses, and every DCP chunk lies inside a
file the manifest lists. Before a checkpoint is loaded (and by every tool) every file's CRC-32 is
compared with the manifest's, so a flipped bit is an error naming the file instead of silently
wrong weights.

Reading a checkpoint never runs code from it (checkpoints travel between people and clusters):
the manifest is JSON; `.metadata`, a pickle, is parsed only after its size and CRC-32 check, by
the restricted unpickler of checkpoint/dcp_reader.py; entries are tensors only (DCP would unpickle a
non-tensor entry with torch.load(weights_only=False)), read through dcp_reader.SafeReader. A
checkpoint that would need more is refused with CheckpointRefused, which `resume: auto` and
retention never skip past silently: format_version 1 checkpoints (RNG states pickled) are refused
(tools/ckpt_inspect.py --upgrade converts them without reading those).

Rank 0 writes the manifest after DCP's finish step (which runs after every rank's writes
returned), renames the directory into place, then rewrites `latest`. A crash before the rename
leaves only a .tmp- directory; a crash after it leaves a complete step_ directory, which
`resume: auto` finds because it scans step numbers rather than trusting `latest`. An existing
step_ directory is only ever replaced when it holds a moetrain manifest (never a user's).

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

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moetrain.checkpoint import dcp_reader
from moetrain.errors import first_line

FORMAT = "moetrain-dcp"
FORMAT_VERSION = 2          # 2: every entry a tensor (1 pickled the RNG states: refused)
MANIFEST = "manifest.json"
LATEST = "latest"
DCP_METADATA = ".metadata"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_STALE_RE = re.compile(r"^\.(tmp|old)-step_\d{8,}$")      # only our own names: never a user's file


# DCP warns that it runs in one process (we ask it to, at world 1; async writes warn from their
# own thread, so a scoped catch_warnings cannot hide it) and that it overwrites a directory (only
# ever our own .tmp- directory). Neither tells a user anything.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint in .*overwriting.*")


class CheckpointError(RuntimeError):
    """One line naming the checkpoint (or file) and what is wrong with it."""


class CheckpointRefused(CheckpointError):
    """Reading the checkpoint would run or unpickle something a moetrain checkpoint never holds:
    crafted, or an old format. Never skipped silently (resume: auto, retention): one line, stop."""


@dataclass
class CheckpointInfo:
    path: str
    step: int
    manifest: dict
    metadata: Any            # torch.distributed.checkpoint.metadata.Metadata
    contents_checked: bool = False     # every file's CRC-32 already compared with the manifest's


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


def parse_metadata(path: str, refuse_pickled: bool = True):
    """DCP's global metadata of the checkpoint at `path`, parsed by the restricted unpickler (no
    collective). Raises CheckpointRefused when the pickle asks for anything DCP metadata never
    holds (or, refuse_pickled, an entry is a pickled object), CheckpointError when unreadable."""
    mpath = os.path.join(path, DCP_METADATA)
    try:
        with open(mpath, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: file {DCP_METADATA} cannot be read "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    try:
        metadata = dcp_reader.loads_metadata(data)
    except dcp_reader.UnsafeMetadataError as exc:
        raise CheckpointRefused(f"checkpoint {path}: file {DCP_METADATA} is refused: {exc}; it was crafted "
                                "(to run code when unpickled) or not written by torch.distributed.checkpoint: "
                                "not reading it") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: file {DCP_METADATA} cannot be read ({first_line(exc)})") from None
    pickled = dcp_reader.bytes_entries(metadata) if refuse_pickled else []
    if pickled:
        raise CheckpointRefused(f"checkpoint {path}: file {DCP_METADATA} lists entry {pickled[0]} as a pickled "
                                "object, which only unpickling (running code from the file) could read, and "
                                "moetrain never writes one: refused")
    return metadata


def read_manifest(path: str) -> dict:
    """manifest.json of a checkpoint directory, checked for the fields readers rely on."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} is corrupt "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} has format_version {version!r}, not a "
                              "positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {version!r} is newer than this "
                              f"moetrain reads ({FORMAT_VERSION}); upgrade moetrain")
    files, crcs = manifest.get("files"), manifest.get("crc32", {})
    if not isinstance(files, dict) or DCP_METADATA not in files or not _is_count(manifest.get("step")):
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} lacks 'files' (with {DCP_METADATA}) "
                              "or 'step'")
    for rel, size in files.items():
        if not _plain_name(rel) or not _is_count(size):
            raise CheckpointError(f"checkpoint {path}: file {MANIFEST} lists {rel!r} with size {size!r}: "
                                  "not a file of this directory with a size")
    if not isinstance(crcs, dict) or not all(rel in files and _is_count(c) for rel, c in crcs.items()) or (
            version >= 2 and set(crcs) != set(files)):
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} lacks a CRC-32 of every file it lists")
    return manifest


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def _plain_name(rel) -> bool:
    return isinstance(rel, str) and rel not in ("", ".", "..") and not any(c in rel for c in "/\\\0")


def verify(path: str, contents: bool = False, old_format: bool = False) -> CheckpointInfo:
    """File-level completeness check of one checkpoint directory; no collective, no tensor reads.
    Order: the manifest (JSON), every listed file's size, the CRC-32 of .metadata (of every file
    with contents=True), and only then .metadata is parsed (restricted unpickler).
    format_version 1 (pickled RNG states) is refused unless old_format (convert.upgrade, which
    reads its tensors only)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a file, not a checkpoint directory")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        if os.path.isfile(os.path.join(path, DCP_METADATA)):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing, so the save never "
                                  "completed (or the file was deleted); refusing to load it")
        raise CheckpointError(f"checkpoint {path}: not a moetrain checkpoint (no {MANIFEST}, "
                              f"no {DCP_METADATA}; it holds {_describe_dir(path)})")
    manifest = read_manifest(path)
    if manifest["format_version"] < 2 and not old_format:
        raise CheckpointRefused(
            f"checkpoint {path}: {MANIFEST} records format_version {manifest['format_version']}: an older moetrain "
            "stored RNG states as pickled objects, and reading those could run code from the files: refused; convert it with "
            f"`python tools/ckpt_inspect.py {path} --upgrade NEW_DIR` (weights, optimizer and step are kept, the "
            "pickled RNG states are dropped unread)")
    files = manifest["files"]
    for rel, size in sorted(files.items()):
        fpath = os.path.join(path, rel)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: file {rel} listed in {MANIFEST} is missing")
        actual = os.path.getsize(fpath)
        if actual != size:
            what = "truncated" if actual < size else "larger than recorded"
            raise CheckpointError(f"checkpoint {path}: file {rel} is {what} ({actual} bytes, "
                                  f"{MANIFEST} records {size})")
    _check_crcs(path, manifest, None if contents else DCP_METADATA)
    metadata = parse_metadata(path, refuse_pickled=manifest["format_version"] >= 2)
    _check_chunks(path, metadata, files)
    return CheckpointInfo(path, manifest["step"], manifest, metadata, contents_checked=contents)


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def check_contents(info: CheckpointInfo) -> None:
    """Every file's CRC-32 equals the manifest's (reads every byte, once per CheckpointInfo)."""
    if not info.contents_checked:
        _check_crcs(info.path, info.manifest, None)
        info.contents_checked = True


def _check_crcs(path: str, manifest: dict, only: Optional[str]) -> None:
    crcs = manifest.get("crc32") or {}
    for rel, want in sorted(crcs.items()):
        if only is not None and rel != only:
            continue
        fpath = os.path.join(path, rel)
        try:
            got = file_crc32(fpath)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: file {rel} cannot be read "
                                  f"({type(exc).__name__}: {first_line(exc)})") from None
        if got != want:
            raise CheckpointError(f"checkpoint {path}: file {rel} is corrupt (CRC-32 {got:08x}, "
                                  f"{MANIFEST} records {want:08x})")


def _check_chunks(path: str, metadata, sizes: dict[str, int]) -> None:
    """Every chunk DCP will read lies inside a file the manifest vouches for (commit: the files
    just written). Names are plain file names (dcp_reader.check_structure)."""
    for index, info in metadata.storage_data.items():
        rel = info.relative_path
        size = sizes.get(rel)
        if size is None:
            raise CheckpointError(f"checkpoint {path}: shard file {rel} (holding {index.fqn}) is missing "
                                  f"from {MANIFEST}")
        if info.offset + info.length > size:
            raise CheckpointError(f"checkpoint {path}: shard file {rel} is truncated: {index.fqn} needs "
                                  f"bytes up to {info.offset + info.length}, the file has {size}")


def find_complete(root: str, old_format: bool = False) -> tuple[list[CheckpointInfo], list[str]]:
    """Complete checkpoints under root, newest first, and one warning line per skipped step_ dir.
    A refused one (CheckpointRefused) is raised, not skipped."""
    good, warnings = [], []
    for _, path in list_step_dirs(root):
        try:
            good.append(verify(path, old_format=old_format))
        except CheckpointRefused:
            raise
        except CheckpointError as exc:
            warnings.append(f"skipping incomplete or corrupt checkpoint: {exc}")
    return good, warnings


def resolve_path(path: str, old_format: bool = False) -> tuple[list[CheckpointInfo], list[str]]:
    """checkpoint.resume=<path>: a step directory, a checkpoint.dir (newest complete inside), or
    a checkpoint.dir's `latest` file (the step directory it names). old_format: see verify."""
    if os.path.basename(path.rstrip("/")) == LATEST and os.path.isfile(path):
        named = read_latest(os.path.dirname(os.path.abspath(path)))
        if not named:
            raise CheckpointError(f"checkpoint pointer {path}: does not name a step_* directory")
        path = named
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)) and list_step_dirs(path):
        good, warnings = find_complete(path, old_format)
        if not good:
            raise CheckpointError(f"checkpoint directory {path}: none of its step_* checkpoints is "
                                  f"complete ({warnings[0].split(': ', 1)[1]})")
        return good, warnings
    return [verify(path, contents=True, old_format=old_format)], []


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
    """Every rank writes its share of `flat` into `path`. Returns a Future when async_save.
    Tensors only: DCP pickles anything else, and reading would have to unpickle it."""
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"saving checkpoint {path}: entry {key} is a {type(value).__name__}, "
                                  "not a tensor; moetrain checkpoints hold tensors only")
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
    """Fill the tensors of `flat` in place from the checkpoint at `path` (a collective over group).
    .metadata is parsed by the restricted unpickler and only tensor entries are read."""
    try:
        dcp.load(flat, storage_reader=dcp_reader.SafeReader(path), planner=dcp_reader.SafePlanner(),
                 process_group=group, no_dist=group is None)
    except CheckpointException as exc:
        raise CheckpointError(f"checkpoint {path}: reading failed: {describe_dcp_error(exc)}") from None


def describe_dcp_error(exc: BaseException) -> str:
    """CheckpointException carries one (exception, traceback) per failed rank: keep one line."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return first_line(exc)
    rank = min(failures)
    inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
    return f"rank {rank}: {type(inner).__name__}: {first_line(inner)}"


# ----------------------------------------------------------------------------- commit


class Faults:
    """Fault-injection points, all no-ops. The crash-safety tests pass a subclass that ends the
    process at one of them (Checkpointer(faults=...), see tests/checkpoint/_faulty_main.py)."""

    def at_step(self, step: int, rank: int) -> None:
        """Every rank, at the top of training step `step` (after that step's save started)."""

    def before_save(self, step: int) -> None:
        """Every rank, at the top of Checkpointer.save (before the save of `step` starts)."""

    def in_commit(self, phase: str, step: int) -> None:
        """Rank 0 in commit(), phases in order: written (DCP files done, no manifest), manifest
        (written, not renamed), renamed (step_ dir in place, `latest` not yet updated)."""


NO_FAULTS = Faults()


def commit(tmp: str, root: str, step: int, fields: dict, faults: Faults = NO_FAULTS) -> str:
    """Rank 0, after every rank's DCP writes finished: verify the files, write the manifest, rename
    tmp -> step_NNNNNNNN, rewrite `latest`. Returns the final path. An existing step_NNNNNNNN is
    replaced only when it is a moetrain checkpoint (a re-save after a crash): never a user's."""
    final = os.path.join(root, step_dirname(step))
    _refuse_foreign(final)
    metadata = parse_metadata(tmp, refuse_pickled=False)
    sizes = {}
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, tmp)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    _check_chunks(tmp, metadata, sizes)
    faults.in_commit("written", step)
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, step=step, created=time.time(), **fields)
    manifest["files"] = dict(sorted(sizes.items()))
    manifest["crc32"] = {rel: file_crc32(os.path.join(tmp, rel)) for rel in sorted(sizes)}
    _write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    faults.in_commit("manifest", step)
    old = None
    if os.path.lexists(final):
        _refuse_foreign(final)        # re-saving a step (a restart after a crash past it): swap, then delete
        old = os.path.join(root, OLD_PREFIX + step_dirname(step))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    faults.in_commit("renamed", step)
    _write_atomic(os.path.join(root, LATEST), step_dirname(step) + "\n")
    return final


def prune(root: str, keep_last: int, newest_step: int) -> list[str]:
    """Delete complete checkpoints older than the keep_last newest ones at or below newest_step.
    Checkpoints newer than newest_step and directories that do not verify are left alone, so the
    only complete checkpoint is never deleted (the one just committed is always kept). A refused
    checkpoint (CheckpointRefused) is raised: someone put it there."""
    complete = []
    for step, path in list_step_dirs(root):
        if step > newest_step:
            continue
        try:
            verify(path)
        except CheckpointRefused:
            raise
        except CheckpointError:
            continue
        complete.append(path)
    removed = []
    for path in complete[max(1, keep_last):]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def read_latest(root: str) -> Optional[str]:
    """The step directory `latest` names, or None (missing, unreadable, garbage)."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):           # never open a FIFO or device someone put there
        return None
    try:
        with open(path, "rb") as f:
            name = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return os.path.join(root, name) if parse_step(name) is not None else None


def foreign_reason(path: str) -> Optional[str]:
    """Why the existing `path` is not a moetrain checkpoint directory we may replace (None: it is
    one, by its manifest; contents are not checked)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return "is a symbolic link or not a directory"
    try:
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise OSError("no manifest")
        with open(os.path.join(path, MANIFEST), "rb") as f:
            ours = json.loads(f.read(1 << 24)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    return None if ours else f"is not a moetrain checkpoint (no readable {MANIFEST})"


def _refuse_foreign(path: str) -> None:
    """Raise unless `path` is absent or a directory holding a moetrain manifest."""
    if not os.path.lexists(path):
        return
    why = foreign_reason(path)
    if why:
        raise CheckpointError(f"{path} already exists and {why}: refusing to replace it; move it out of "
                              f"{os.path.dirname(path)} or choose another checkpoint.dir")


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


