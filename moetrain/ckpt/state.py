"""Training state <-> one flat checkpoint dict whose keys do not depend on the parallel layout.

Keys (tensor values unless noted):
  model/<fqn>                           dense parameter or persistent buffer (several ranks hold
                                        it; DCP writes one copy)
  model/<fqn>/expert_<g>                slice g along dim 0 of a parameter or buffer that lives
                                        in a GroupedExperts module; g is the GLOBAL expert id
  optim/<param fqn>/<state>             optimizer state (AdamW: exp_avg, exp_avg_sq, step)
  optim/<param fqn>/expert_<g>/<state>  slice g of an expert parameter's state tensor that has
                                        the expert dim; state without it (AdamW's scalar step)
                                        stays whole under optim/<param fqn>/<state>
  train/step, train/tokens_seen         int64 scalars (the data position and the LR schedule
                                        are functions of step: batches depend only on seed+step)
  rng/rank_<r>                          bytes: pickled python/numpy/torch(/cuda) RNG states of rank r

Because experts are addressed by global id, an ep=4 rank holding experts 4..5 and an ep=2 rank
holding 4..7 name the same keys, and DCP maps them to whatever was written.
"""
from __future__ import annotations

import pickle
import random
import re
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from moetrain.ckpt.store import CheckpointError
from moetrain.moe.experts import GroupedExperts

_MODEL_RE = re.compile(r"^model/(?P<name>[^/]+)(?:/expert_(?P<g>\d+))?$")
_OPTIM_RE = re.compile(r"^optim/(?P<name>[^/]+?)(?:/expert_(?P<g>\d+))?/(?P<k>[^/]+)$")
STEP_KEY, TOKENS_KEY = "train/step", "train/tokens_seen"


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}"


def model_key(name: str, expert: Optional[int] = None) -> str:
    return f"model/{name}" if expert is None else f"model/{name}/expert_{expert}"


def optim_key(name: str, state: str, expert: Optional[int] = None) -> str:
    return f"optim/{name}/{state}" if expert is None else f"optim/{name}/expert_{expert}/{state}"


def parse_model_key(key: str) -> Optional[tuple[str, Optional[int]]]:
    m = _MODEL_RE.match(key)
    return (m.group("name"), None if m.group("g") is None else int(m.group("g"))) if m else None


def parse_optim_key(key: str) -> Optional[tuple[str, Optional[int], str]]:
    m = _OPTIM_RE.match(key)
    return (m.group("name"), None if m.group("g") is None else int(m.group("g")), m.group("k")) if m else None


def _expert_owner(name: str, modules: dict[str, nn.Module]) -> Optional[GroupedExperts]:
    owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
    return owner if isinstance(owner, GroupedExperts) else None


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Local tensors (views sharing storage with the model, so loading writes into it)."""
    modules = dict(model.named_modules())
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        owner = _expert_owner(name, modules)
        if owner is None:
            out[model_key(name)] = t
        else:
            for i in range(t.shape[0]):
                out[model_key(name, owner.expert_offset + i)] = t[i]
    return out


def expert_tensor_names(model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in model.state_dict(keep_vars=True) if _expert_owner(n, modules) is not None]


def expected_model(model: nn.Module, ep: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every model key of the GLOBAL model (all experts), with shape and dtype."""
    modules = dict(model.named_modules())
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if _expert_owner(name, modules) is None:
            out[model_key(name)] = (tuple(t.shape), t.dtype)
        else:
            for g in range(t.shape[0] * ep):
                out[model_key(name, g)] = (tuple(t.shape[1:]), t.dtype)
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optim_entries(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    """The optimizer's current state under global keys (views where split by expert)."""
    modules = dict(model.named_modules())
    names = _param_names(model)
    out: dict[str, object] = {}
    for p, st in opt.state.items():
        name = names[id(p)]
        owner = _expert_owner(name, modules)
        for k, v in st.items():
            if owner is not None and torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == p.shape[0]:
                for i in range(v.shape[0]):
                    out[optim_key(name, k, owner.expert_offset + i)] = v.detach()[i]
            else:
                out[optim_key(name, k)] = v.detach() if torch.is_tensor(v) else v
    return out


def optim_schema(metadata) -> dict[str, dict[str, tuple[bool, tuple, torch.dtype]]]:
    """{param: {state: (split by expert, shape per entry, dtype)}} as stored in a checkpoint."""
    schema: dict[str, dict] = {}
    for key, md in metadata.state_dict_metadata.items():
        parsed = parse_optim_key(key)
        if parsed is None or not hasattr(md, "size"):
            continue
        name, g, k = parsed
        schema.setdefault(name, {})[k] = (g is not None, tuple(md.size), md.properties.dtype)
    return schema


def build_optim_state(model: nn.Module, opt: torch.optim.Optimizer, schema: dict) -> dict[str, torch.Tensor]:
    """Allocate the optimizer state the checkpoint holds (for this rank's params) and return the
    load targets. Scalars live on the CPU and the rest on the parameter's device, as torch.optim's
    own load_state_dict places them (AdamW non-capturable: step on CPU)."""
    modules = dict(model.named_modules())
    targets: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name not in schema:
            continue
        owner = _expert_owner(name, modules)
        state = {}
        for k, (split, shape, dtype) in schema[name].items():
            if split:
                t = torch.zeros((p.shape[0],) + shape, dtype=dtype, device=p.device)
                for i in range(p.shape[0]):
                    targets[optim_key(name, k, owner.expert_offset + i)] = t[i]
            else:
                t = torch.zeros(shape, dtype=dtype, device=p.device if len(shape) else "cpu")
                targets[optim_key(name, k)] = t
            state[k] = t
        opt.state[p] = state
    return targets


def check_fits(metadata, model: nn.Module, ep: int, where: str, hint: str = "") -> list[str]:
    """Raise CheckpointError naming the first tensor that does not fit the model (shape, dtype,
    missing, or extra). Returns warning lines (e.g. no optimizer state at all)."""
    stored = metadata.state_dict_metadata
    expected = expected_model(model, ep)
    suffix = f" ({hint})" if hint else ""

    def fail(msg: str):
        raise CheckpointError(f"checkpoint {where} does not fit the model: {msg}{suffix}")

    for key, (shape, dtype) in expected.items():
        md = stored.get(key)
        if md is None:
            fail(f"tensor {key} {list(shape)} is missing from the checkpoint")
        if not hasattr(md, "size"):
            fail(f"{key} is stored as bytes, not a tensor")
        if tuple(md.size) != shape:
            fail(f"tensor {key} has shape {list(md.size)} in the checkpoint but {list(shape)} in the model")
        if md.properties.dtype != dtype:
            fail(f"tensor {key} has dtype {md.properties.dtype} in the checkpoint but {dtype} in the model")
    for key in stored:
        if key.startswith("model/") and key not in expected:
            fail(f"the checkpoint holds tensor {key}, which the model does not have")
    if STEP_KEY not in stored:
        fail(f"{STEP_KEY} is missing")

    schema = optim_schema(metadata)
    if not schema:
        return ["checkpoint has no optimizer state: the optimizer starts fresh"]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name in schema:
        if name not in params:
            fail(f"it holds optimizer state for {name}, which the model does not have")
    for name, p in params.items():
        if name not in schema:
            fail(f"optimizer state for parameter {name} is missing")
        owner = _expert_owner(name, modules)
        for k, (split, shape, _) in schema[name].items():
            want = tuple(p.shape[1:]) if split else tuple(p.shape)
            if len(shape) and shape != want:
                fail(f"optimizer state {optim_key(name, k)} has shape {list(shape)}, the parameter {list(want)}")
            if split:
                if owner is None:
                    fail(f"optimizer state {k} of dense parameter {name} is stored per expert")
                for g in range(p.shape[0] * ep):
                    if optim_key(name, k, g) not in stored:
                        fail(f"optimizer state {optim_key(name, k, g)} is missing")
    return []


def train_entries(step: int, tokens_seen: int) -> dict[str, torch.Tensor]:
    return {STEP_KEY: torch.tensor(step, dtype=torch.int64), TOKENS_KEY: torch.tensor(tokens_seen, dtype=torch.int64)}


def capture_rng(device: torch.device) -> bytes:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return pickle.dumps(st)


def restore_rng(blob: bytes, device: torch.device) -> None:
    st = pickle.loads(blob)
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ----------------------------------------------------------------------------- consolidated form


def to_consolidated(flat: dict, manifest: dict) -> dict:
    """Flat checkpoint dict -> {"model": full state dict (experts stacked [E, ...]) that loads
    into a world-1 Transformer, "optim": {param: {state: tensor}}, "train", "rng", "manifest"}."""
    model: dict = {}
    optim: dict = {}
    experts: dict = {}
    out = {"model": model, "optim": optim, "train": {}, "rng": {}, "manifest": manifest}
    for key, v in flat.items():
        if (mk := parse_model_key(key)) is not None:
            name, g = mk
            if g is None:
                model[name] = v
            else:
                experts.setdefault(("model", name, None), {})[g] = v
        elif (ok := parse_optim_key(key)) is not None:
            name, g, k = ok
            if g is None:
                optim.setdefault(name, {})[k] = v
            else:
                experts.setdefault(("optim", name, k), {})[g] = v
        elif key.startswith("train/"):
            out["train"][key[len("train/"):]] = int(v)
        elif key.startswith("rng/rank_"):
            out["rng"][int(key[len("rng/rank_"):])] = v
    for (kind, name, k), by_g in experts.items():
        if sorted(by_g) != list(range(len(by_g))):
            raise CheckpointError(f"{kind} tensor {name}: expert ids {sorted(by_g)} are not 0..{len(by_g) - 1}")
        stacked = torch.stack([by_g[g] for g in range(len(by_g))])
        if kind == "model":
            model[name] = stacked
        else:
            optim.setdefault(name, {})[k] = stacked
    return out


def from_consolidated(full: dict) -> dict:
    """Inverse of to_consolidated: split the tensors named in manifest['expert_tensors'] (and
    their optimizer state with the expert dim) by global expert id."""
    expert_names = set(full["manifest"].get("expert_tensors", []))
    flat: dict = {}
    for name, t in full["model"].items():
        if name in expert_names:
            for g in range(t.shape[0]):
                flat[model_key(name, g)] = t[g]
        else:
            flat[model_key(name)] = t
    for name, states in full.get("optim", {}).items():
        num = full["model"][name].shape[0] if name in expert_names else None
        for k, v in states.items():
            if num is not None and torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == num:
                for g in range(num):
                    flat[optim_key(name, k, g)] = v[g]
            else:
                flat[optim_key(name, k)] = v
    train = full.get("train", {})
    flat.update(train_entries(int(train.get("step", full["manifest"].get("step", 0))),
                              int(train.get("tokens_seen", full["manifest"].get("tokens_seen", 0)))))
    for r, blob in full.get("rng", {}).items():
        flat[rng_key(int(r))] = blob
    return flat
