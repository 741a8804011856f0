"""Whole-checkpoint conversions for the offline tools (no process groups, one process).

resolve/load_all read every tensor of a sharded checkpoint into CPU memory; read_checkpoint gives
the consolidated dict (experts as full [E, ...] tensors, see checkpoint/state.py); write_sharded commits
a consolidated dict as a world-1 sharded checkpoint exactly like training does; save/read
_consolidated move that dict to and from one .pt or .safetensors file; upgrade rewrites a
format_version 1 checkpoint (pickled RNG states) without reading those. run_tool maps the errors
of a tool's body to one `prog: error: ...` line and an exit code.

Like training, nothing here runs code from a file it reads: checkpoints go through store.verify
and store.load_dcp (restricted unpickler, tensors only), .pt files through
torch.load(weights_only=True), .safetensors hold tensors and a JSON manifest.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import torch

from moetrain.checkpoint import state as S
from moetrain.checkpoint import store
from moetrain.checkpoint.lock import CheckpointLockError, DirLock
from moetrain.checkpoint.store import CheckpointError
from moetrain.errors import first_line


def resolve(path: str) -> store.CheckpointInfo:
    """The checkpoint at `path` (a step dir, or the newest complete one of a checkpoint dir),
    with its files' CRC-32s checked: tools never read a damaged checkpoint."""
    infos, warnings = store.resolve_path(path)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    store.check_contents(infos[0])
    return infos[0]


def load_all(info: store.CheckpointInfo) -> dict:
    """Every tensor of the checkpoint, read into fresh CPU tensors. Pickled entries (only a
    format_version 1 checkpoint verified with old_format=True gets here with any) are skipped
    unread."""
    flat: dict = {}
    for key, md in info.metadata.state_dict_metadata.items():
        if hasattr(md, "size"):
            flat[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    store.load_dcp(flat, info.path, None)
    return flat


def read_checkpoint(path: str) -> tuple[store.CheckpointInfo, dict]:
    """(info, consolidated dict) of a checkpoint."""
    info = resolve(path)
    return info, S.to_consolidated(load_all(info), info.manifest)


def save_consolidated(full: dict, out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{out}: cannot write there, {parent} is not a directory")
    if os.path.isdir(out):
        raise CheckpointError(f"{out}: is a directory; give a file path (.pt or .safetensors)")
    if out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("writing .safetensors needs the safetensors package "
                                  "(pip install safetensors), or use a .pt path") from None
        flat = {f"model/{k}": v for k, v in full["model"].items()}
        for name, states in full["optim"].items():
            flat.update({f"optim/{name}/{k}": v for k, v in states.items()})
        flat.update({f"train/{k}": torch.tensor(v, dtype=torch.int64) for k, v in full["train"].items()})
        flat.update({S.rng_key(r, part): t for r, parts in full["rng"].items() for part, t in parts.items()})
        save_file({k: v.contiguous().clone() for k, v in flat.items()}, out,
                  metadata={"manifest": json.dumps(full["manifest"])})
    else:
        torch.save(full, out)


def read_consolidated(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise CheckpointError("reading .safetensors needs the safetensors package") from None
        full: dict = {"model": {}, "optim": {}, "train": {}, "rng": {}}
        try:
            with safe_open(path, framework="pt") as f:
                full["manifest"] = json.loads((f.metadata() or {})["manifest"])
                for key in f.keys():
                    t = f.get_tensor(key)
                    if (mk := S.parse_model_key(key)) is not None:
                        full["model"][mk[0]] = t
                    elif (ok := S.parse_optim_key(key)) is not None:
                        full["optim"].setdefault(ok[0], {})[ok[2]] = t
                    elif key.startswith("train/"):
                        full["train"][key[len("train/"):]] = int(t)
                    elif (rk := S.parse_rng_key(key)) is not None:
                        full["rng"].setdefault(rk[0], {})[rk[1]] = t
                    else:
                        raise ValueError(f"unknown key {key}")
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as exc:    # not safetensors, no manifest, a non-scalar train/ entry...
            raise CheckpointError(f"{path}: not a readable consolidated checkpoint ({type(exc).__name__}: "
                                  f"{first_line(exc)[:200]})") from None
        _check_consolidated(full, path)
        return full
    try:
        # weights_only: tensors and plain containers only; a crafted .pt cannot run code here
        full = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:    # truncated zip, random bytes (EINVAL), a pickle with foreign objects
        raise CheckpointError(f"{path}: not a readable consolidated checkpoint ({type(exc).__name__}: "
                              f"{first_line(exc)[:200]})") from None
    if not isinstance(full, dict) or "model" not in full or "manifest" not in full:
        raise CheckpointError(f"{path}: not a consolidated moetrain checkpoint (needs 'model' and 'manifest')")
    _check_consolidated(full, path)
    return full


def _check_consolidated(full: dict, path: str) -> None:
    """The structure write_sharded relies on (a .pt loads as any dict of tensors and plain values)."""
    def bad(what):
        raise CheckpointError(f"{path}: not a consolidated moetrain checkpoint ({what})")
    model, manifest = full["model"], full["manifest"]
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        bad("'model' must be a non-empty dict of name -> tensor")
    if not isinstance(manifest, dict):
        bad("'manifest' must be a dict")
    optim = full.get("optim", {})
    if not isinstance(optim, dict) or not all(isinstance(v, dict) for v in optim.values()):
        bad("'optim' must be a dict of name -> state dict")
    if set(optim) - set(model):
        bad(f"'optim' names tensors that 'model' lacks: {sorted(set(optim) - set(model))[:3]}")
    train = full.get("train", {})
    if not isinstance(train, dict):
        bad("'train' must be a dict")
    for key in ("step", "tokens_seen"):
        v = train.get(key, manifest.get(key, 0))
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            bad(f"train.{key} must be an integer >= 0, got {v!r}")
    rng = full.get("rng", {})
    if not isinstance(rng, dict) or not all(
            isinstance(r, int) and r >= 0 and isinstance(parts, dict) and all(
                part in S.RNG_PARTS and torch.is_tensor(t) and t.dtype == S.RNG_PARTS[part][0] and t.dim() == 1
                for part, t in parts.items())
            for r, parts in rng.items()):
        bad("'rng' must be a dict of rank -> {python|numpy|gauss|torch|cuda: 1-d tensor} (files written before "
            "format_version 2 held pickled bytes there)")


def write_sharded(full: dict, out_dir: str, source: str) -> str:
    """A consolidated dict -> <out_dir>/step_<step>/ (DCP, one writer), committed like training does."""
    flat = S.from_consolidated(full)
    step = int(flat[S.STEP_KEY])
    fields = {k: v for k, v in full["manifest"].items()
              if k not in ("format", "format_version", "step", "created", "files", "crc32", "save_s")}
    fields.update(converted_from=os.path.abspath(source), world=1, layout={"dp": 1, "tp": 1, "ep": 1})
    os.makedirs(out_dir, exist_ok=True)
    try:
        with DirLock(out_dir):         # as training does: never write beside a live run
            existing = [p for st, p in store.list_step_dirs(out_dir) if st >= step]
            if existing:
                raise CheckpointError(f"{out_dir} already holds {os.path.basename(existing[0])}: writing step "
                                      f"{step} there would replace it or move `latest` back; choose an empty "
                                      "--out directory")
            tmp = store.tmp_dir_for(out_dir, step)
            store.remove_stale(out_dir)
            store.save_dcp(flat, tmp, None)
            return store.commit(tmp, out_dir, step, fields)
    except CheckpointLockError as exc:
        raise CheckpointError(str(exc)) from None


def upgrade(path: str, out_dir: str) -> str:
    """A format_version 1 checkpoint (RNG states pickled) -> a current one in out_dir: every tensor
    (model, optimizer, step, tokens seen) is copied; the pickled entries are never read, so a resume
    from the result starts fresh RNG streams (as after a change of world size)."""
    infos, warnings = store.resolve_path(path, old_format=True)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    info = infos[0]
    if info.manifest["format_version"] >= 2:
        raise CheckpointError(f"checkpoint {info.path} is already format_version {info.manifest['format_version']}: "
                              "nothing to upgrade")
    store.check_contents(info)
    full = S.to_consolidated(load_all(info), info.manifest)
    full["rng"] = {}
    full["manifest"] = dict(full["manifest"], upgraded_from_format_version=info.manifest["format_version"])
    return write_sharded(full, out_dir, info.path)


def run_tool(prog: str, body: Callable[[], object], usage_errors: tuple = ()) -> int:
    """Run a tool's body: 0 on success; `usage_errors` (bad config, impossible request) -> one
    error line and 2; unreadable or bad checkpoints and I/O errors -> one error line and 1."""
    try:
        body()
    except usage_errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
