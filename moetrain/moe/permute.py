"""Pure index math for dispatch: group token copies by expert, and regroup received blocks.

Shape legend: T tokens, K choices, N kept copies, E experts (global), R ranks of the EP group,
L = E / R local experts per rank.
"""
from __future__ import annotations

import torch

from moetrain.moe.routing import count_ids


def sort_by_expert(expert_idx_TK: torch.Tensor, kept_TK: torch.Tensor,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All T*K copies ordered by expert id, kept copies first (stable, so token order inside an
    expert is preserved), dropped copies after them. No host sync: the shapes do not depend on
    how many copies were kept.

    Returns (token_idx_C, copy_idx_C, counts_E) over C = T*K entries: the first N = counts_E.sum()
    are the kept copies; x[token_idx_C[:N]] is the expert-sorted input, copy_idx_C indexes the
    flattened [T*K] choices (to pick each copy's weight), counts_E[e] is the length of expert e's
    contiguous slice. Sorting by global expert id also sorts by destination rank, because rank r
    owns experts [r*L, (r+1)*L).
    """
    K = expert_idx_TK.shape[1]
    # dropped copies get the sentinel id E, which sorts after every expert
    key = torch.where(kept_TK, expert_idx_TK, num_experts).reshape(-1)
    copy_idx_C = torch.argsort(key, stable=True)
    token_idx_C = torch.div(copy_idx_C, K, rounding_mode="floor")
    counts_E = count_ids(key, num_experts + 1)[:num_experts]
    return token_idx_C, copy_idx_C, counts_E


def to_replicas(expert_idx_TK: torch.Tensor, kept_TK: torch.Tensor, slots_EC: torch.Tensor,
                replicas_E: torch.Tensor, salt: int) -> torch.Tensor:
    """Each kept copy's destination slot under a placement with replicas (moe.placement=balanced).

    slots_EC[e, j] is the global slot id (rank * slots_per_rank + local slot) of expert e's j-th
    replica, replicas_E[e] = c_e how many there are. The i-th kept copy of expert e in this rank's
    (token, choice) order goes to replica (i + salt) % c_e: every replica gets an even share of this
    rank's copies for e, and different `salt`s (the source's EP rank) start the round elsewhere, so
    the remainders spread too. Pure and host-sync free; dropped copies map to slot 0 (sort_by_expert
    puts them after every kept one anyway). -> slot_idx_TK (int64).
    """
    E = slots_EC.shape[0]
    key = torch.where(kept_TK, expert_idx_TK, E).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = count_ids(key, E + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device) - starts[key[order]]
    e = key.clamp(max=E - 1)
    j = (pos + salt) % replicas_E[e]
    return torch.where(key < E, slots_EC[e, j], 0).view_as(expert_idx_TK)


def rank_splits(counts_E: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Copies going to each rank: counts_E summed over each rank's L experts -> [R]."""
    return counts_E.view(num_ranks, -1).sum(dim=1)


def regroup_by_expert(counts_RL: torch.Tensor, total: int) -> torch.Tensor:
    """Permutation that turns the received (source rank, local expert) block order into
    (local expert, source rank) order, so each local expert's rows are contiguous.

    counts_RL[r, l]: rows that source rank r sent for local expert l, laid out r-major after the
    all-to-all; total = counts_RL.sum(), known on the host from the split exchange (passing it
    spares repeat_interleave a host sync). recv[perm] is l-major. The inverse is
    `invert_permutation(perm)`.
    """
    R, L = counts_RL.shape
    block_id = torch.arange(R * L, device=counts_RL.device)
    rows_block = torch.repeat_interleave(block_id, counts_RL.reshape(-1), output_size=total)
    src_rank, local_expert = rows_block // L, rows_block % L
    return torch.argsort(local_expert * R + src_rank, stable=True)


class _GatherRows(torch.autograd.Function):
    """src.index_select(0, idx) whose backward scatters with index_add_.

    Autograd's backward for `src[idx]` is index_put_(accumulate=True), which on CPU is ~4x
    slower than index_add_ single-threaded and ~20x slower with two intra-op threads (measured
    on [8192, 256] rows: 12.8 ms vs 0.7 ms at 2 threads). index_add_ sums the rows of each
    target in index order (CPU); on CUDA it follows torch's deterministic-algorithms setting.
    """

    @staticmethod
    def forward(ctx, src, idx):
        ctx.save_for_backward(idx)
        ctx.rows = src.shape[0]
        return src.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        idx, = ctx.saved_tensors
        grad_src = grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:]))
        return grad_src.index_add_(0, idx, grad), None


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along dim 0 (differentiable in src; idx may repeat rows)."""
    return _GatherRows.apply(src, idx)


class _PermuteRows(torch.autograd.Function):
    """src.index_select(0, perm) for a permutation; backward gathers with the inverse (no zero
    fill, no scatter)."""

    @staticmethod
    def forward(ctx, src, perm, inverse):
        ctx.save_for_backward(inverse)
        return src.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(src: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """src[perm] along dim 0, where perm is a permutation and inverse = invert_permutation(perm)."""
    return _PermuteRows.apply(src, perm, inverse)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
