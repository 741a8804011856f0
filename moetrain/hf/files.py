"""Hugging Face model directories on disk: config.json, safetensors shards and their index, the
tokenizer. Reading runs no code from the files (JSON and safetensors only).

Written as save_pretrained writes them: `model.safetensors` when everything fits one shard, else
`model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json` ({"metadata":
{"total_size": bytes}, "weight_map": {tensor: shard file}}); each shard carries the metadata
{"format": "pt"}. Tensors are assigned to shards in order, a new shard starting when the next
tensor would pass the limit (a tensor larger than the limit gets a shard of its own).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from moetrain.checkpoint.store import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class HFFileError(ValueError):
    """One line: an HF directory that cannot be written or read as asked (exit 2)."""


class HFReadError(CheckpointError):
    """One line: HF files that are damaged or unreadable (exit 1, as for a damaged checkpoint)."""


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1GiB', '123456' -> bytes (decimal units as transformers uses them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise HFFileError(f"--max-shard-size {text!r}: give bytes or a size such as 500MB, 5GB, 2GiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size < 1:
        raise HFFileError(f"--max-shard-size {text!r} must be at least 1 byte")
    return size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def check_out_dir(out: str) -> None:
    if any(os.path.exists(os.path.join(out, name)) for name in ("config.json", SINGLE, INDEX)):
        raise HFFileError(f"--out {out} already holds a model: choose a new or empty directory")


def write_hf_dir(out: str, config: dict, tensors: dict, max_shard_bytes: int) -> list[str]:
    """config.json + safetensors shards (+ index when more than one) into `out` (created; must not
    hold a model already). Returns the files written."""
    from safetensors.torch import save_file
    check_out_dir(out)
    os.makedirs(out, exist_ok=True)
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        # safetensors refuses tensors that share memory (tied or views): each gets its own copy
        path = os.path.join(out, name)
        save_file({k: tensors[k].detach().contiguous().clone() for k in keys}, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())   # safetensors writes 0600; others' servers must read it
        weight_map.update({k: name for k in keys})
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(out, INDEX), index)
        written.append(INDEX)
    _write_json(os.path.join(out, "config.json"), config)
    written.append("config.json")
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_hf_dir(path: str) -> tuple[dict, dict]:
    """(config.json as a dict, {tensor name: CPU tensor}) of an HF model directory holding
    safetensors (one file, or shards named by model.safetensors.index.json)."""
    from safetensors import safe_open
    if not os.path.isdir(path):
        raise HFFileError(f"--hf {path}: not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFFileError(f"--hf {path}: no config.json")
    config = _read_json(cfg_path)
    if os.path.isfile(os.path.join(path, INDEX)):
        index = _read_json(os.path.join(path, INDEX))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFReadError(f"{os.path.join(path, INDEX)}: no weight_map")
        bad = [v for v in weight_map.values() if not isinstance(v, str)]
        if bad:
            raise HFReadError(f"{os.path.join(path, INDEX)}: weight_map names shard {str(bad[0])[:60]!r}, "
                              "not a file name")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, SINGLE)):
        files = [SINGLE]
    else:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        raise HFFileError(f"--hf {path}: no {SINGLE} or {INDEX}" + (
            " (pytorch_model.bin files are pickles: convert them to safetensors first)" if bins else ""))
    tensors: dict = {}
    for name in files:
        fp = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(fp):
            raise HFReadError(f"{path}: shard {name!r} named by the index is missing")
        try:
            with safe_open(fp, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:        # truncated or not safetensors
            raise HFReadError(f"{fp}: not a readable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return config, tensors


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as exc:
        raise HFReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise HFReadError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:       # JSONDecodeError, UnicodeDecodeError, an integer literal too long
        raise HFReadError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:200] if str(exc) else exc!r})") from None
    if not isinstance(obj, dict):
        raise HFReadError(f"{path}: must hold a JSON object")
    return obj


def write_tokenizer(codec, out: str, max_len: int) -> list[str]:
    """The training data's Hugging Face tokenizer (an HFCodec from moetrain.tokenizer, its file's
    bytes as verified against meta.json's sha256) as tokenizer.json + a minimal
    tokenizer_config.json (PreTrainedTokenizerFast, the end-of-document token as eos_token);
    returns the files written."""
    with open(os.path.join(out, "tokenizer.json"), "wb") as f:
        f.write(codec.content)
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if codec.eod_token is not None:
        conf["eos_token"] = codec.eod_token
    _write_json(os.path.join(out, "tokenizer_config.json"), conf)
    return ["tokenizer.json", "tokenizer_config.json"]
