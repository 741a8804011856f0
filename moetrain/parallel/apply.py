"""Add parallelism to a built, parallelism-agnostic model (torchtitan's parallelize pattern)."""
from __future__ import annotations

import torch.nn as nn

from moetrain.moe.dispatch import AllToAllDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.parallel.mesh import Parallel


def apply_ep(model: nn.Module, par: Parallel) -> None:
    """Keep this rank's E/ep experts in every MoE layer and route tokens over the EP group.

    Call before init_weights: shards are sliced from the (uninitialized) full stack and then
    filled by global expert id, so values match the single-process model.
    """
    ep = par.dims.ep
    if ep == 1:
        return
    for mod in model.modules():
        if isinstance(mod, MoELayer):
            local = mod.num_experts // ep
            mod.experts.shard_(par.ep_rank * local, local)
            mod.dispatcher = AllToAllDispatcher(mod.num_experts, par.ep_group, par.ep_rank, ep)


def is_expert_param(name: str, module_of: dict[str, nn.Module]) -> bool:
    owner = name.rsplit(".", 1)[0]
    return isinstance(module_of.get(owner), GroupedExperts)


def split_params(model: nn.Module) -> tuple[list, list]:
    """(dense params, expert params): they synchronize over different groups."""
    module_of = dict(model.named_modules())
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (expert if is_expert_param(name, module_of) else dense).append(p)
    return dense, expert
