"""The Transformer's tensor-parallel plan on torch.distributed.tensor.parallel (Megatron layout).

Activations between blocks stay replicated over the tp mesh; inside a block the work is split:
  attention   wq/wk/wv ColwiseParallel (whole heads per rank), wo RowwiseParallel; with grouped-query
              attention wk/wv shard whole K/V heads (tp divides n_kv_heads), and rank r's query
              heads read exactly its own K/V heads (model/transformer.Attention)
  dense FFN   w1/w3 ColwiseParallel, w2 RowwiseParallel (also the MoE layers' shared experts)
  embedding   RowwiseParallel: vocab rows [r*V/tp, (r+1)*V/tp); the partial lookups are summed
  head        ColwiseParallel to logits sharded on the vocab (a DTensor), for loss_parallel
              (parallel/tp.cross_entropy_sum); a tied head shares the embedding's DTensor
  experts     replicated over tp (every TP rank routes the same tokens and exchanges them with
              its EP group: the ranks with the same tp index), or with etp each expert's w1/w3
              sharded on H (column) and w2 on H (row)
Each attention / FFN block takes its input as ONE replicated DTensor (PrepareModuleInput), so
the gradients of its column-parallel layers are summed locally and all-reduced once, and every
TP rank ends the backward with the full gradient of each replicated activation: a parameter
whole on every TP rank (norms, router, ...) gets the same complete gradient on each, with no
reduction over tp. SequenceParallel does not fit: the residual stream must stay whole on every TP
rank, because the MoE layers route and exchange the full sequence on each of them.

etp: an expert weight is a DTensor on the tp mesh only, Shard(2) for w1/w3 [L, D, H] and
Shard(1) for w2 [L, H, D], whose dim 0 holds this rank's L local experts (the EP split stays as
it was: plain slices by global expert id, named by GroupedExperts.expert_offset). One DTensor over
(ep, tp) would need the expert dim sharded over ep too, but experts are addressed per global id
(checkpoint keys, init, the dispatcher's local ids) and EP exchanges tokens with its own
all-to-all, which DTensor does not express; the tp placement is the part other code must read
(norm accounting, FSDP's choice of dim, checkpoints), and it is the part a DTensor can state.
GroupedExperts computes on plain tensors (its grouped kernels take dynamic row counts), so
parallel/tp.LocalShardParallel hands it the local shards during forward.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from moetrain.model.transformer import Attention
from moetrain.moe.experts import GroupedExperts, SwiGLU
from moetrain.parallel.tp import LocalShardParallel, grad_as_placed, read_params_as


def _block(name: str, n_inputs: int, cols: tuple, rows: tuple) -> dict:
    """One replicated DTensor input (the first positional arg), column then row parallel."""
    layouts = (Replicate(),) + (None,) * (n_inputs - 1)
    plan = {name: PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts)}
    plan.update({f"{name}.{c}": ColwiseParallel() for c in cols})
    plan.update({f"{name}.{r}": RowwiseParallel() for r in rows})
    return plan


def apply_tp(model: nn.Module, tp_mesh, etp: bool = False) -> None:
    """Shard attention, dense FFNs, embedding and head over `tp_mesh` (and each expert's hidden
    dim with etp); a no-op without a mesh (tp=1). Call AFTER init_weights: shards are slices of
    the full weights."""
    if tp_mesh is None:
        return
    plan = {"embed": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            assert mod.n_heads % tp_mesh.size() == 0, (mod.n_heads, tp_mesh.size())
            assert mod.n_kv_heads % tp_mesh.size() == 0, (mod.n_kv_heads, tp_mesh.size())
            plan.update(_block(name, 3, ("wq", "wk", "wv"), ("wo",)))   # whole heads: rows h*Dh..
        elif isinstance(mod, SwiGLU):
            plan.update(_block(name, 1, ("w1", "w3"), ("w2",)))
        elif isinstance(mod, GroupedExperts) and etp:
            # rows arrive identical on every TP rank (same routing, same EP exchange)
            plan[name] = LocalShardParallel({"w1": 2, "w3": 2, "w2": 1})
    tied = model.head.weight is model.embed.weight
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
    if tied:
        model.head.weight = model.embed.weight       # the head's Shard(0) is the embedding's
    # DTensor's embedding backward has no row-sharded strategy: it makes the full-vocab gradient
    # (Replicate) on every rank, of which .grad keeps this rank's rows (a local slice, no
    # collective). A hook on the parameter would not do: module.to() swaps DTensor parameters.
    read_params_as(model.embed, ["weight"], grad_as_placed)
