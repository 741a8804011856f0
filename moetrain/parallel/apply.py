"""Add parallelism to a built, parallelism-agnostic model (torchtitan's parallelize pattern).

Order (train/loop.build_trainer): apply_ep (before init: experts are filled by global id),
(with moe.placement=balanced: which experts each rank's slots hold), init_weights, apply_tp (after init: TP shards are slices of the full weights; model/tp_plan.py)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from moetrain.moe.dispatch import AllToAllDispatcher, GroupSum, RowShardDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.moe.peer import PEERLayer
from moetrain.parallel.mesh import Parallel
from moetrain.parallel.replicas import ExpertPlacer


def apply_ep(model: nn.Module, par: Parallel, moe=None) -> Optional[ExpertPlacer]:
    """Keep this rank's experts in every MoE layer and route tokens over the EP group: E/ep
    contiguous experts (moe.placement=static, or moe None), or the slots of the first balanced
    placement (parallel/replicas.py), whose ExpertPlacer is returned (None otherwise).

    Call before init_weights: shards are sliced from the (uninitialized) full stack and then
    filled by global expert id, so values match the single-process model.
    """
    ep = par.dims.ep
    if ep == 1:
        return None
    layers = []
    for mod in model.modules():
        if isinstance(mod, MoELayer):
            mod.dispatcher = AllToAllDispatcher(mod.num_experts, par.ep_group, par.ep_rank, ep)
            layers.append(mod)
        elif isinstance(mod, PEERLayer):
            rows = mod.num_experts // ep
            mod.shard_(par.ep_rank * rows, rows)
            mod.dispatcher = RowShardDispatcher(par.ep_group, ep)
    if moe is not None and moe.placement == "balanced":
        placer = ExpertPlacer(layers, moe.num_ffn_experts, moe.redundant_experts, moe.rebalance_every, par)
        placer.apply()
        return placer
    for mod in layers:
        assert mod.num_experts % ep == 0, f"{mod.num_experts} experts do not split over ep={ep} (static placement)"
        local = mod.num_experts // ep
        mod.experts.shard_(par.ep_rank * local, local)
    return None


def apply_routing_groups(model: nn.Module, par: Parallel) -> None:
    """Give MoE layers that balance over the global batch (moe.aux_loss_scope=global_batch) the
    sum of their load counts over the data-parallel group."""
    for mod in model.modules():
        if isinstance(mod, MoELayer) and mod.router.cfg.aux_loss_scope == "global_batch" and par.dims.dp > 1:
            mod.count_sum = GroupSum(par.dp_group, par.dims.dp)


def is_peer_table(name: str, module_of: dict[str, nn.Module]) -> bool:
    """PEER expert tables (a PEERLayer's expert_* params): row-sharded over ep."""
    owner, _, leaf = name.rpartition(".")
    return isinstance(module_of.get(owner), PEERLayer) and leaf.startswith("expert_")


def is_expert_param(name: str, module_of: dict[str, nn.Module]) -> bool:
    """Params sharded over EP (synced over edp): grouped experts and PEER expert tables."""
    return isinstance(module_of.get(name.rpartition(".")[0]), GroupedExperts) or is_peer_table(name, module_of)


def sparse_grad_params(model: nn.Module) -> list:
    """The PEER expert tables whose gradients are sparse rows (moe.peer.sparse_updates): summed
    over edp by parallel/grads.SparseRowSum instead of the dense all-reduce."""
    return [p for mod in model.modules() if isinstance(mod, PEERLayer) and mod.sparse_grads
            for name, p in mod.named_parameters(recurse=False) if name.startswith("expert_") and p.requires_grad]


def split_params(model: nn.Module) -> tuple[list, list]:
    """(dense params, expert params): they synchronize over different groups."""
    module_of = dict(model.named_modules())
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (expert if is_expert_param(name, module_of) else dense).append(p)
    return dense, expert
