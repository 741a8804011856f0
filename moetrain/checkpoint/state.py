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
  rng/rank_<r>/python                   int64 [625]: rank r's `random` Mersenne Twister words +
                                        position (random.getstate()[1])
  rng/rank_<r>/numpy                    int64 [626]: np.random's 624 key words, pos, has_gauss
  rng/rank_<r>/gauss                    float64 [3]: python has gauss_next (0/1), gauss_next,
                                        numpy's cached gaussian
  rng/rank_<r>/torch, .../cuda          uint8: torch.get_rng_state() (and the CUDA generator's)

Every entry is a tensor: nothing in a checkpoint is a pickled object (reading one with DCP's
default planner would run torch.load(weights_only=False) on it, see checkpoint/dcp_reader.py).

Because experts are addressed by global id, an ep=4 rank holding experts 4..5 and an ep=2 rank
holding 4..7 name the same keys, and DCP maps them to whatever was written.

Tensors sharded along another dim are stored whole under their key and handed to DCP as a
DTensor over the device mesh, so DCP records each rank's slice and reshards on load:
  - PEER expert tables ([num_keys^2, D] single-neuron experts, row-sharded over "ep"; per-expert
    keys would be far too many),
  - tensor-parallel shards (DTensors on the "tp" mesh, model/tp_plan.py: Shard(d) splits dim d
    over "tp"), including each expert's slice of an etp-sharded expert weight.
Optimizer state shaped like its parameter follows the parameter's placement.

Saving reads the optimizer state through DCP's get_optimizer_state_dict (by parameter FQN; its
param_groups are not saved, lr etc. follow config and step); the expert split is ours (DCP knows
no expert dim). Loading does not use set_optimizer_state_dict: dcp.load needs its targets (the
per-expert views) before reading, so build_optim_state allocates the states the checkpoint holds
(a parameter without saved state stays without, as in the uninterrupted run) and then only has
to do `opt.state[p] = state`. set_optimizer_state_dict would add a zero-gradient optimizer step
(to create state we already have) and Optimizer.load_state_dict, which takes lr, betas, eps and
weight_decay from the param_groups passed in: a tensors-only checkpoint has none, AdamW then
fails with KeyError 'betas'. (DeepSpeed: no checkpoints, config validation refuses them.)

FSDP (parallel/fsdp.py) shards a parameter once more, over "dp" (dense) or "edp" (experts), on a
dim that is neither its TP dim nor an expert's dim 0 and that it divides evenly: the rank's shard
is then a plain block of the key's global tensor, handed to DCP as a DTensor with more Shard
placements on the (edp, ep, tp) mesh: Shard(d) on "edp" for experts, on "edp" and "ep" for dense
params (an even split over edp, then ep, is the split over the flattened dp). Every such split is
read from the parameter's DTensor placements (_AXES maps its mesh axes to ours). Keys and global
shapes do not change, so an FSDP checkpoint loads at any layout, with or without FSDP, and back.
"""
from __future__ import annotations

import random
import re
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from moetrain.checkpoint.store import CheckpointError
from moetrain.errors import first_line
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.apply import is_peer_table

_MODEL_RE = re.compile(r"^model/(?P<name>[^/]+)(?:/expert_(?P<g>\d+))?$")
_OPTIM_RE = re.compile(r"^optim/(?P<name>[^/]+?)(?:/expert_(?P<g>\d+))?/(?P<k>[^/]+)$")
_RNG_RE = re.compile(r"^rng/rank_(?P<r>\d{5,})/(?P<part>[a-z]+)$")
STEP_KEY, TOKENS_KEY = "train/step", "train/tokens_seen"
_MT_N = 624                                  # Mersenne Twister state words (python and numpy)
# part -> (dtype, shape or None for "any 1-d length"); cuda is optional (only CUDA ranks save it)
RNG_PARTS = {"python": (torch.int64, (_MT_N + 1,)), "numpy": (torch.int64, (_MT_N + 2,)),
             "gauss": (torch.float64, (3,)), "torch": (torch.uint8, None), "cuda": (torch.uint8, None)}


def rng_key(rank: int, part: str) -> str:
    return f"rng/rank_{rank:05d}/{part}"


def parse_rng_key(key: str) -> Optional[tuple[int, str]]:
    m = _RNG_RE.match(key)
    return (int(m.group("r")), m.group("part")) if m else None


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


# a DTensor's mesh axis -> the axes of the checkpoint mesh (edp, ep, tp) it spans ("dp" is
# edp x ep flattened, edp outer: an even split over dp is the nested split over edp, then ep)
_AXES = {"tp": ("tp",), "dp": ("edp", "ep"), "edp": ("edp",)}


class _Placement:
    """How one model tensor maps to checkpoint keys: split by GroupedExperts along dim 0 (owner),
    and which dims of each key's tensor are sharded over which mesh axis (splits). A DTensor (TP
    and/or FSDP shard) has the global shape and says its splits in its placements; a PEER table
    is a plain block of rows over ep, a split its shape does not show (grow)."""

    def __init__(self, name: str, t: torch.Tensor, modules: dict[str, nn.Module], sizes: dict[str, int]):
        self.owner = _expert_owner(name, modules)
        self.sizes = sizes
        self.grow: dict[str, int] = {}
        if is_peer_table(name, modules) and sizes.get("ep", 1) > 1 and t.shape[0] != modules[name.rsplit(".", 1)[0]].num_experts:
            self.grow["ep"] = 0
        self.splits = dict(self.grow)
        for axis, placement in zip(t.device_mesh.mesh_dim_names, t.placements) if _is_dtensor(t) else ():
            if placement.is_shard():
                self.splits.update(dict.fromkeys(_AXES[axis], placement.dim - (self.owner is not None)))

    def keys(self, base: str, local_shape: tuple) -> list[tuple[str, Optional[int]]]:
        if self.owner is None:
            return [(base, None)]
        return [(f"{base}/expert_{self.owner.expert_ids[i]}", i) for i in range(local_shape[0])]

    def global_shape(self, shape: tuple) -> tuple:
        """Shape of one key's global tensor from the model tensor's shape (expert dim dropped)."""
        shape = list(shape[1:] if self.owner is not None else shape)
        for axis, dim in self.grow.items():
            shape[dim] *= self.sizes[axis]
        return tuple(shape)

    def wrap(self, local: torch.Tensor, mesh, shape: tuple) -> torch.Tensor:
        """One key's local tensor as DCP should see it: a DTensor of the key's global `shape`
        when sharded across ranks."""
        if not self.splits:
            return local
        if mesh is None:
            raise CheckpointError("a sharded tensor needs the device mesh to be checkpointed")
        from torch.distributed.tensor import DTensor, Replicate, Shard
        placements = [Shard(self.splits[n]) if n in self.splits else Replicate() for n in mesh.mesh_dim_names]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's data of a tensor: the shard of a DTensor (shares its storage)."""
    return t.to_local() if _is_dtensor(t) else t


def _entries(pl: "_Placement", base: str, t: torch.Tensor, mesh, suffix: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint keys -> load/save targets of one parameter-shaped tensor t (views of its data)."""
    data = _local(t.detach())
    shape = pl.global_shape(tuple(t.shape))
    keys = pl.keys(base, tuple(t.shape))
    return {key + suffix: pl.wrap(data if i is None else data[i], mesh, shape) for key, i in keys}


def mesh_sizes(mesh) -> dict[str, int]:
    if mesh is None:
        return {}
    return {n: mesh.size(i) for i, n in enumerate(mesh.mesh_dim_names)}


def _placements(model: nn.Module, sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, _Placement]]:
    modules = dict(model.named_modules())
    return {name: (t, _Placement(name, t, modules, sizes)) for name, t in model.state_dict(keep_vars=True).items()}


def model_entries(model: nn.Module, mesh=None) -> dict[str, torch.Tensor]:
    """Local tensors (views sharing storage with the model, so loading writes into it)."""
    out = {}
    for name, (t, pl) in _placements(model, mesh_sizes(mesh)).items():
        out.update(_entries(pl, model_key(name), t, mesh))
    return out


def expert_tensor_names(model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in model.state_dict(keep_vars=True) if _expert_owner(n, modules) is not None]


def buffer_names(model: nn.Module) -> list[str]:
    """Persistent buffers (state_dict entries that are not parameters, e.g. aux-free biases)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return [n for n in model.state_dict(keep_vars=True) if n not in params]


def expected_model(model: nn.Module, sizes: dict[str, int]) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every model key of the GLOBAL model (all experts, whole TP tensors), with shape and dtype.
    sizes: the mesh axis sizes ({"ep": .., "tp": ..})."""
    out = {}
    for name, (t, pl) in _placements(model, sizes).items():
        shape = pl.global_shape(tuple(t.shape))
        if pl.owner is None:
            out[model_key(name)] = (shape, t.dtype)
        else:
            for g in range(pl.owner.global_experts):
                out[model_key(name, g)] = (shape, t.dtype)
    return out


def _like_param(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() >= 1


def optim_entries(model: nn.Module, opt: torch.optim.Optimizer, mesh=None) -> dict[str, object]:
    """The optimizer's current state under global keys: state shaped like its parameter is split
    and sharded like the parameter; anything else (AdamW's scalar step) is stored whole."""
    if not opt.state:       # none yet: get_optimizer_state_dict would create it with a fake step
        return {}
    placements = _placements(model, mesh_sizes(mesh))
    out: dict[str, object] = {}
    for name, st in get_optimizer_state_dict(model, opt)["state"].items():   # by parameter FQN
        p, pl = placements[name]
        for k, v in st.items():
            if _like_param(v, p):
                out.update(_entries(pl, f"optim/{name}", v, mesh, f"/{k}"))
            elif torch.is_tensor(v):
                out[optim_key(name, k)] = v.detach()
            else:      # DCP would pickle it, and reading it back would unpickle it: never
                raise CheckpointError(f"optimizer state {k} of {name} is a {type(v).__name__}, not a tensor: "
                                      "moetrain checkpoints hold tensors only")
    return out


def optim_schema(metadata) -> dict[str, dict[str, tuple[bool, tuple, torch.dtype]]]:
    """{param: {state: (split by expert, global shape per key, dtype)}} as stored in a checkpoint."""
    schema: dict[str, dict] = {}
    for key, md in metadata.state_dict_metadata.items():
        parsed = parse_optim_key(key)
        if parsed is None or not hasattr(md, "size"):
            continue
        name, g, k = parsed
        schema.setdefault(name, {})[k] = (g is not None, tuple(md.size), md.properties.dtype)
    return schema


def build_optim_state(model: nn.Module, opt: torch.optim.Optimizer, schema: dict, mesh=None) -> dict[str, torch.Tensor]:
    """Allocate the optimizer state the checkpoint holds (for this rank's params) and return the
    load targets. State shaped like the parameter lives with it (same device, same shards);
    scalars live on the CPU, as torch.optim's own load_state_dict places them."""
    placements = _placements(model, mesh_sizes(mesh))
    targets: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name not in schema:
            continue
        pl = placements[name][1]
        param_global = pl.global_shape(tuple(p.shape))
        state = {}
        for k, (split, shape, dtype) in schema[name].items():
            if split or (len(shape) and shape == param_global):
                # like the parameter: an FSDP parameter's state is a DTensor with its placement
                t = torch.zeros_like(p.detach(), dtype=dtype)
                targets.update(_entries(pl, f"optim/{name}", t, mesh, f"/{k}"))
            else:
                t = torch.zeros(shape, dtype=dtype, device=p.device if len(shape) else "cpu")
                targets[optim_key(name, k)] = t
            state[k] = t
        opt.state[p] = state
    return targets


def check_fits(metadata, model: nn.Module, sizes: dict[str, int], where: str, hint: str = "") -> list[str]:
    """Raise CheckpointError naming the first tensor that does not fit the model (shape, dtype,
    missing, or extra). sizes: the mesh axis sizes. Returns warning lines."""
    stored = metadata.state_dict_metadata
    expected = expected_model(model, sizes)
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
    for key in (STEP_KEY, TOKENS_KEY):
        md = stored.get(key)
        if md is None:
            fail(f"{key} is missing")
        if not hasattr(md, "size") or tuple(md.size) != () or md.properties.dtype != torch.int64:
            fail(f"{key} is not an int64 scalar tensor")
    rng_layout(metadata, where)

    schema = optim_schema(metadata)
    if not schema:
        return ["checkpoint has no optimizer state: the optimizer starts fresh"]
    placements = _placements(model, sizes)
    params = dict(model.named_parameters())
    for name in schema:
        if name not in params:
            fail(f"it holds optimizer state for {name}, which the model does not have")
    for name, p in params.items():
        if name not in schema:
            continue    # no state yet (e.g. a parameter that never had a gradient): AdamW starts it lazily
        pl = placements[name][1]
        want = pl.global_shape(tuple(p.shape))
        for k, (split, shape, _) in schema[name].items():
            if split != (pl.owner is not None) and len(shape):
                fail(f"optimizer state {k} of {name} is {'' if split else 'not '}stored per expert, "
                     f"the parameter {'is not' if split else 'is'}")
            if len(shape) and shape != want:
                fail(f"optimizer state {optim_key(name, k)} has shape {list(shape)}, the parameter {list(want)}")
            if split:
                for g in range(pl.owner.global_experts):
                    if optim_key(name, k, g) not in stored:
                        fail(f"optimizer state {optim_key(name, k, g)} is missing")
    return []


def save_entries(trainer, par) -> dict[str, torch.Tensor]:
    """Everything a checkpoint (or an in-memory snapshot) of this rank holds: model and optimizer
    under their global keys, the step counters and this rank's RNG states."""
    flat = model_entries(trainer.model, par.mesh)
    flat.update(optim_entries(trainer.model, trainer.opt, par.mesh))
    flat.update(train_entries(trainer.state.step, trainer.state.tokens_seen))
    flat.update(capture_rng(par.rank, par.device))
    return flat


def manifest_fields(trainer, par) -> dict:
    """Collective (the expert placement's state): what a checkpoint's or a snapshot's manifest
    records about the state it holds: tokens seen, the layout it was saved at, its expert tensors
    and buffers, and the balanced placement when there is one."""
    d = par.dims
    out = {"tokens_seen": trainer.state.tokens_seen, "world": par.world, "layout": {"dp": d.dp, "tp": d.tp, "ep": d.ep},
           "expert_tensors": expert_tensor_names(trainer.model), "buffers": buffer_names(trainer.model)}
    if getattr(trainer, "placer", None) is not None:
        out["placement"] = trainer.placer.state()
    return out


def train_entries(step: int, tokens_seen: int) -> dict[str, torch.Tensor]:
    return {STEP_KEY: torch.tensor(step, dtype=torch.int64), TOKENS_KEY: torch.tensor(tokens_seen, dtype=torch.int64)}


def rng_layout(metadata, where: str = "checkpoint") -> dict[int, dict[str, tuple]]:
    """{rank: {part: (shape, dtype)}} of the RNG states a checkpoint holds. Raises CheckpointError
    for an rng/ entry that is not one of RNG_PARTS with its dtype and shape, or a rank that lacks
    a part every rank saves."""
    out: dict[int, dict[str, tuple]] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith("rng/"):
            continue
        parsed = parse_rng_key(key)
        if parsed is None or parsed[1] not in RNG_PARTS:
            raise CheckpointError(f"checkpoint {where}: unknown RNG entry {key}")
        dtype, shape = RNG_PARTS[parsed[1]]
        if not hasattr(md, "size") or md.properties.dtype != dtype or len(md.size) != 1 or (
                shape is not None and tuple(md.size) != shape):
            raise CheckpointError(f"checkpoint {where}: RNG entry {key} is not a {dtype} tensor"
                                  + (f" of shape {list(shape)}" if shape else " of one dimension"))
        out.setdefault(parsed[0], {})[parsed[1]] = (tuple(md.size), dtype)
    for rank, parts in out.items():
        missing = sorted(set(RNG_PARTS) - {"cuda"} - set(parts))
        if missing:
            raise CheckpointError(f"checkpoint {where}: RNG entry {rng_key(rank, missing[0])} is missing")
    return out


def rng_targets(rank: int, parts: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Load targets (CPU tensors) for one rank's RNG parts, as rng_layout describes them."""
    return {rng_key(rank, part): torch.empty(shape, dtype=dtype) for part, (shape, dtype) in parts.items()}


def capture_rng(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors under rng/rank_<rank>/<part> (see the module doc)."""
    version, words, gauss_next = random.getstate()
    assert version == 3 and len(words) == _MT_N + 1, "CPython's random state layout changed"
    name, key, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937" and key.shape == (_MT_N,), "numpy's legacy RNG state layout changed"
    parts = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.cat([torch.from_numpy(key.astype(np.int64)),
                            torch.tensor([pos, has_gauss], dtype=torch.int64)]),
        "gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0, cached], dtype=torch.float64),
        "torch": torch.get_rng_state().clone(),
    }
    if device.type == "cuda":
        parts["cuda"] = torch.cuda.get_rng_state(device).clone()
    return {rng_key(rank, part): t for part, t in parts.items()}


def prepare_rng(rank: int, flat: dict, device: torch.device):
    """Check the RNG states of `rank` loaded into `flat` on throwaway generators and return a
    function that installs them. Raises ValueError naming the entry when one is not a valid
    state, before anything in this process has changed."""
    t = {part: flat[rng_key(rank, part)] for part in RNG_PARTS if rng_key(rank, part) in flat}
    gauss = t["gauss"].tolist()
    py_state = (3, tuple(t["python"].tolist()), gauss[1] if gauss[0] else None)
    words = t["numpy"].tolist()
    # numpy does not range-check pos (an index into its key array) or has_gauss itself
    if any(not 0 <= w < 2 ** 32 for w in words[:_MT_N]) or not 0 <= words[_MT_N] <= _MT_N \
            or words[_MT_N + 1] not in (0, 1) or gauss[0] not in (0.0, 1.0):
        raise ValueError(f"RNG entry {rng_key(rank, 'numpy')} (or {rng_key(rank, 'gauss')}) is not a valid state")
    np_state = ("MT19937", np.array(words[:_MT_N], dtype=np.uint32), words[_MT_N], words[_MT_N + 1], gauss[2])
    for part, check in (("python", lambda: random.Random().setstate(py_state)),
                        ("numpy", lambda: np.random.RandomState().set_state(np_state)),
                        ("torch", lambda: torch.Generator().set_state(t["torch"]))):
        try:
            check()
        except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"RNG entry {rng_key(rank, part)} is not a valid state "
                             f"({type(exc).__name__}: {first_line(exc)[:200]})") from None
    cuda = t.get("cuda") if device.type == "cuda" else None
    if cuda is not None and cuda.numel() != torch.cuda.get_rng_state(device).numel():
        raise ValueError(f"RNG entry {rng_key(rank, 'cuda')} has {cuda.numel()} bytes, this GPU's state "
                         f"{torch.cuda.get_rng_state(device).numel()}")

    def install() -> None:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(t["torch"])
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    return install


# ----------------------------------------------------------------------------- consolidated form


def to_consolidated(flat: dict, manifest: dict) -> dict:
    """Flat checkpoint dict -> {"model": full state dict (experts stacked [E, ...]) that loads
    into a world-1 Transformer, "optim": {param: {state: tensor}}, "train": {step, tokens_seen},
    "rng": {rank: {part: tensor}}, "manifest"}."""
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
        elif (rk := parse_rng_key(key)) is not None:
            out["rng"].setdefault(rk[0], {})[rk[1]] = v
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
    for r, parts in full.get("rng", {}).items():
        for part, t in parts.items():
            flat[rng_key(int(r), part)] = t
    return flat
