"""Sharded data parallelism with FSDP2 (`parallel.fsdp: true`, engine native).

`apply_fsdp(model, par)` runs after apply_ep / init_weights / apply_tp and before the optimizer
is built. It shards every parameter over the ranks that hold a replica of it:
  dense params (incl. TP shards, routers, norms) over "dp"  (edp x ep flattened)
  expert params (GroupedExperts)                 over "edp" (the ranks holding the same experts)
A TP shard (a DTensor on the tp mesh, model/tp_plan.py) becomes a DTensor on (dp or edp, tp): the
FSDP meshes are slices of the same root mesh as the tp mesh, as FSDP2 requires for that.
Units: each GroupedExperts (its own group on the edp mesh), each transformer block and the root
(embedding, final norm, head) on the dp mesh, bottom-up as FSDP2 wants it.

Gradients: FSDP reduce-scatters them in backward. The trainer's loss is CE_sum / global tokens,
so each rank holds its share of the global mean and the reduction must be a SUM, which FSDP2
does not do by default (it averages): every unit gets `set_gradient_divide_factor(1.0)` and
`set_force_sum_reduction_for_comms(True)` (gloo has neither AVG nor PREMUL_SUM). The loop's own
all-reduce (parallel/grads.GradientSync) skips the DTensor parameters FSDP manages; clipping
sums each DTensor's local squares over the mesh dims it is sharded on (grads.grad_sq_norms).

Which tensor dim FSDP splits (`fsdp_shard_dim`) is chosen so that a rank's shard is a plain
block of the parameter's global tensor, which lets checkpoints (checkpoint/state.py) describe it as a
DTensor over the mesh without gathering anything:
  - never the TP shard dim (a TP shard split again on the same dim would interleave),
  - never an expert parameter's dim 0 (checkpoints store one tensor per global expert id),
  - the first remaining dim the FSDP mesh size divides: even shards (FSDP2 needs them off
    dim 0; and an even split over the flattened dp axis is the same as one over edp, then ep,
    which is how checkpoints describe it on the (edp, ep, tp) mesh).
A parameter with no such dim, and PEER expert tables (their layer mixes expert and dense
params), are left to the loop's all-reduce: FSDP ignores them (`ignored_params`).

Each unit reshards after forward (also the root, whose FSDP2 default keeps the gathered weights
after forward): between steps and after an evaluation every managed parameter is its shard, so
a checkpoint taken at any step boundary sees the same layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from moetrain.config import ConfigError

from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.apply import is_expert_param
from moetrain.parallel.mesh import Parallel


def fsdp_shard_dim(shape: tuple, is_expert: bool, tp_dim: Optional[int], size: int) -> Optional[int]:
    """The dim FSDP shards a parameter of `shape` on over `size` ranks: the first allowed dim
    that `size` divides. None = leave it unsharded."""
    banned = {tp_dim} | ({0} if is_expert else set())
    for d in range(len(shape)):
        if d not in banned and shape[d] % size == 0:
            return d
    return None


def _plan(model: nn.Module, par: Parallel) -> tuple[dict[int, int], set]:
    """({id(param): shard dim}, ignored params)."""
    modules = dict(model.named_modules())
    dims: dict[int, int] = {}
    ignored: set = set()
    for name, p in model.named_parameters():
        expert = is_expert_param(name, modules)
        owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
        size = par.dims.edp if expert else par.dims.dp
        if expert and not isinstance(owner, GroupedExperts):
            d = None                       # PEER expert tables
        else:
            tp_dim = next((pl.dim for pl in p.placements if pl.is_shard()), None) if isinstance(p, DTensor) else None
            d = fsdp_shard_dim(tuple(p.shape), expert, tp_dim, size)
        if d is None:
            ignored.add(p)
        else:
            dims[id(p)] = d
    return dims, ignored


def fsdp_dtypes(param: str, reduce: str, bf16_autocast: bool) -> tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(param_dtype, reduce_dtype) for FSDP's MixedPrecisionPolicy from parallel.fsdp_param_dtype /
    fsdp_reduce_dtype; None = the parameters' own fp32.

    param auto: bf16 when training runs under bf16 autocast (all-gathers move half the bytes, and
    the gathered weights are what autocast would cast them to anyway), else fp32. bf16 weights
    without autocast would meet fp32 activations in every matmul: refused."""
    if param == "auto":
        param = "bfloat16" if bf16_autocast else "float32"
    if param == "bfloat16" and not bf16_autocast:
        raise ConfigError("parallel.fsdp_param_dtype='bfloat16' is not allowed without bf16 autocast "
                          "(train.precision=bf16, or auto on CUDA): use float32 (or auto)")
    as_dtype = {"float32": None, "bfloat16": torch.bfloat16}
    return as_dtype[param], as_dtype[reduce]


def apply_fsdp(model: nn.Module, par: Parallel, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Shard `model` in place with FSDP2 (see the module docstring). Returns the names of the
    parameters left unsharded (synced by the loop's all-reduce). A no-op when dp == 1.

    param_dtype / reduce_dtype (see fsdp_dtypes): the all-gather / compute dtype of the
    unsharded parameters and the reduce-scatter dtype; None keeps fp32. Module inputs are not
    cast (cast_forward_inputs=False): the residual stream stays fp32 and autocast casts what
    each matmul reads, as without FSDP."""
    if par.dims.dp == 1 or par.mesh is None:
        return []
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    dims, ignored = _plan(model, par)
    left_out = [n for n, p in model.named_parameters() if p in ignored]

    def placement(p):
        return Shard(dims[id(p)])

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    common = dict(reshard_after_forward=True, shard_placement_fn=placement, ignored_params=ignored, mp_policy=mp)
    # our existing groups (init_parallel made them), slices of the root mesh that tp_mesh is of
    dp_mesh, edp_mesh = par.mesh["edp", "ep"]._flatten("dp"), par.mesh["edp"]
    units = []
    for mod in model.modules():
        if isinstance(mod, GroupedExperts) and any(p not in ignored for p in mod.parameters(recurse=False)):
            units.append(fully_shard(mod, mesh=edp_mesh, **common))
    for block in getattr(model, "layers", []):
        units.append(fully_shard(block, mesh=dp_mesh, **common))
    units.append(fully_shard(model, mesh=dp_mesh, **common))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)          # SUM over the mesh, never the mean
        unit.set_force_sum_reduction_for_comms(True)
    return left_out
