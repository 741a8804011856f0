"""Gradient synchronization and clipping across the mesh.

The trainer scales every micro-step loss by 1/(tokens in the GLOBAL batch), so each rank's
gradient is its share of the global mean: the right reduction is a SUM, never an average.
  dense params  : SUM over dp   (every dp rank saw different tokens)
  expert params : SUM over edp  (the all-to-all backward already summed the contributions of
                  every rank in the EP group; edp replicas saw the remaining tokens)
Averaging instead (DDP's default) would shrink expert gradients by ep relative to dense ones —
the classic bug that tests/parallel/test_grads.py guards against.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


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


def sync_gradients(dense: list, expert: list, dp_group, edp_group, dp: int, edp: int) -> None:
    if dp > 1:
        _flat_all_reduce(dense, dp_group)
    if edp > 1:
        _flat_all_reduce(expert, edp_group)


def clip_grad_norm(dense: list, expert: list, max_norm: float, ep_group, ep: int) -> float:
    """One global L2 norm over all parameters, as if the model lived in one process.

    After sync, dense grads are identical on every rank; expert grads differ across the EP group
    (each rank holds other experts) and are identical across edp. So the global squared norm is
    dense_sq + SUM_over_ep(expert_sq). Returns the norm before clipping.
    """
    def sq(params):
        gs = [p.grad for p in params if p.grad is not None]
        if not gs:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack([g.float().pow(2).sum() for g in gs]).sum()

    dense_sq = sq(dense)
    expert_sq = sq(expert).to(dense_sq.device)
    if ep > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    total = math.sqrt(float(dense_sq + expert_sq))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in list(dense) + list(expert):
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
