"""Gradient synchronization and clipping across the mesh.

The trainer scales every micro-step loss by 1/(tokens in the GLOBAL batch), so each rank's
gradient is its share of the global mean: the right reduction is a SUM, never an average.
  dense params  : SUM over dp   (every dp rank saw different tokens)
  expert params : SUM over edp  (the all-to-all backward already summed the contributions of
                  every rank in the EP group; edp replicas saw the remaining tokens)
Averaging instead (DDP's default) would shrink expert gradients by ep relative to dense ones —
the classic bug that tests/parallel/test_cross_layout.py guards against.
Tensor parallelism adds no reduction: the dp and edp groups hold the ranks with the same tp
index, hence the same shard, and replicated parameters already hold complete gradients on every
TP rank (parallel/tp.py). Only the norm has to sum the shards over tp.
Under FSDP (parallel/fsdp.py) the managed parameters are DTensor shards whose gradients FSDP
has already reduce-scattered (as a SUM): sync skips them, and the norm sums each shard's squares
over its FSDP mesh before the tp/ep sums below.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _flat_all_reduce(params: list, group) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    # one coalesced buffer per dtype/device keeps it to one collective
    by_key: dict = {}
    for p, g in zip(params, grads):
        by_key.setdefault((g.dtype, g.device), []).append((p, g))
    for items in by_key.values():
        flat = torch.cat([g.reshape(-1) for _, g in items])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p, g in items:
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g)
            offset += n


def _is_dtensor(p) -> bool:
    return isinstance(p, DTensor)


def sync_gradients(dense: list, expert: list, dp_group, edp_group, dp: int, edp: int) -> None:
    # FSDP-managed parameters (DTensors) were reduce-scattered by FSDP in backward
    if dp > 1:
        _flat_all_reduce([p for p in dense if not _is_dtensor(p)], dp_group)
    if edp > 1:
        _flat_all_reduce([p for p in expert if not _is_dtensor(p)], edp_group)


def grad_sq_norms(dense: list, expert: list, ep_group=None, ep: int = 1, tp_group=None, tp: int = 1) -> dict:
    """Squared L2 norms of the synced gradients, each logical parameter counted once:
    {"dense", "dense_tp", "expert", "expert_tp"} (fp32 scalars, equal on every rank).

      dense (whole)  identical on every rank of the mesh (summed over dp; complete on every TP
                     rank, see parallel/tp.py): counted as is
      dense TP shard differs across tp, identical across dp: summed over tp
      expert         differs across ep (other experts), identical across edp (and tp unless
                     etp): summed over ep
      expert TP shard (etp) differs across ep and tp: summed over ep and tp
    """
    from moetrain.parallel.tp import tp_shard_dim

    device = next((p.grad.device for p in list(dense) + list(expert) if p.grad is not None), torch.device("cpu"))

    def sq(params):
        gs = [p.grad for p in params if p.grad is not None]
        if not gs:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([g.float().pow(2).sum() for g in gs]).sum()

    def split(params):
        whole = [p for p in params if tp_shard_dim(p) is None]
        return whole, [p for p in params if tp_shard_dim(p) is not None]

    plain_dense = [p for p in dense if not _is_dtensor(p)]
    plain_expert = [p for p in expert if not _is_dtensor(p)]
    d_whole, d_tp = split(plain_dense)
    e_whole, e_tp = split(plain_expert)
    vals = torch.stack([sq(d_whole), sq(d_tp), sq(e_whole), sq(e_tp)])
    vals = vals + _fsdp_sq_norms(dense, expert, device)
    if ep > 1:
        ep_part = vals[2:].clone()
        dist.all_reduce(ep_part, group=ep_group)
        vals = torch.cat([vals[:2], ep_part])
    if tp > 1:
        tp_part = vals[1::2].clone()           # the TP-sharded kinds
        dist.all_reduce(tp_part, group=tp_group)
        vals = torch.stack([vals[0], tp_part[0], vals[2], tp_part[1]])
    vals = vals.cpu()
    return {"dense": vals[0], "dense_tp": vals[1], "expert": vals[2], "expert_tp": vals[3]}


def _fsdp_sq_norms(dense: list, expert: list, device) -> torch.Tensor:
    """The four kinds' squared norms over FSDP shards (DTensor grads): each rank of an FSDP mesh
    holds a disjoint block, so the local squares are summed over that mesh (in parameter order,
    the same on every rank). The result is what the unsharded parameters would give."""
    from moetrain.parallel.tp import tp_shard_dim

    buckets: dict = {}          # mesh group -> [4] partial squares
    for kind_base, params in ((0, dense), (2, expert)):
        for p in params:
            if not _is_dtensor(p):
                continue
            # every rank registers every mesh (grad or not), so all join the same all-reduces
            acc = buckets.setdefault(p.device_mesh.get_group(), torch.zeros(4, dtype=torch.float32, device=device))
            if p.grad is not None:
                acc[kind_base + (tp_shard_dim(p) is not None)] += p.grad.to_local().float().pow(2).sum()
    total = torch.zeros(4, dtype=torch.float32, device=device)
    for group, acc in buckets.items():
        dist.all_reduce(acc, group=group)
        total += acc
    return total


def clip_grad_norm(dense: list, expert: list, max_norm: float, ep_group, ep: int,
                   tp_group=None, tp: int = 1) -> float:
    """One global L2 norm over all parameters, as if the model lived in one process (see
    grad_sq_norms for how each kind of parameter is counted). Returns the norm before clipping."""
    total = math.sqrt(float(sum(grad_sq_norms(dense, expert, ep_group, ep, tp_group, tp).values())))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in list(dense) + list(expert):
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
