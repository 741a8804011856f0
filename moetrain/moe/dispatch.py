"""Move token copies to their experts and back.

`dispatch(x_TD, routing, overlap, host_counts)` returns the rows this rank's experts must
process, grouped by local expert, their per-expert `ExpertCounts`, a frozen `DispatchMeta`, and
the result of `overlap()`; `combine(y, meta)` undoes it and applies the gate weights in fp32.
Dispatchers hold no per-step state (DESIGN habit 4).

LocalDispatcher: all experts in this process. Without `host_counts` (the grouped GEMM reads its
offsets on the device) it is free of host syncs: it hands over all T*K copies, kept ones first,
and masks the dropped ones. With `host_counts` (the loop and bmm paths) it reads the counts once
and hands over only the kept copies.
AllToAllDispatcher: experts sharded over an EP group; copies travel by two uneven all-to-alls
(dispatch and combine), both differentiable. The count exchange's device-to-host copy is the one
host sync per layer and micro-step that uneven all-to-alls need. Under moe.placement=balanced
(`set_placement`) it sends to expert slots instead of experts: a copy for global expert e goes to
one of e's replicas (moe/permute.to_replicas), the routing itself is unchanged.

RowShardDispatcher: PEER's tables row-sharded over an EP group (all-gather, reduce-scatter).
GroupSum: per-expert counts summed for the global-batch balance loss. No other MoE code calls a
collective.

Payloads travel in the dtype of x (the layer casts it to the compute dtype: bf16 under autocast).

Shape legend: T tokens, D model dim, C = T*K copies, N kept copies sent, M rows received.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from moetrain.moe.experts import ExpertCounts
from moetrain.moe.permute import (gather_rows, invert_permutation, permute_rows, rank_splits, regroup_by_expert,
                                  sort_by_expert, to_replicas)
from moetrain.moe.routing import Routing
from moetrain.parallel.comm import CommTimer, all_to_all, all_to_all_start, exchange_counts, to_host


@dataclass(frozen=True)
class DispatchMeta:
    num_tokens: int
    token_idx_N: torch.Tensor
    weights_N: torch.Tensor                 # fp32 gate weights, 0 for masked (dropped) copies
    # expert parallel only:
    send_splits: Optional[list] = None      # rows sent to each rank (= rows that come back)
    recv_splits: Optional[list] = None      # rows received from each rank
    regroup_M: Optional[torch.Tensor] = None  # received order -> expert-major order
    ungroup_M: Optional[torch.Tensor] = None  # its inverse: expert-major -> received order
    timer: CommTimer = field(default_factory=CommTimer)


def _combine_local(y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """out[t] = sum over kept copies of t of weight * y, in fp32 whatever dtype y travelled in
    (k bf16 products summed in bf16 would lose the small ones); tokens with no kept copy get 0."""
    dt = torch.promote_types(y_ND.dtype, torch.float32)
    weighted = y_ND.to(dt) * meta.weights_N.to(dt).unsqueeze(1)
    out = weighted.new_zeros((meta.num_tokens, y_ND.shape[1]))
    return out.index_add(0, meta.token_idx_N, weighted)


class LocalDispatcher:
    """All E experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, overlap: Optional[Callable[[], object]] = None,
                 host_counts: bool = True):
        token_idx, copy_idx, counts_E = sort_by_expert(routing.expert_idx_TK, routing.kept_TK, self.num_experts)
        weights = gather_rows(routing.weights_TK.reshape(-1), copy_idx)
        if host_counts:
            counts_L = to_host(counts_E).tolist()      # sync ok: the loop/bmm paths' one read
            n = sum(counts_L)
            token_idx, weights = token_idx[:n], weights[:n]
            counts = ExpertCounts(counts_E, counts_L)
        else:
            # all T*K copies; the dropped ones (after the last expert's rows) get weight 0, and the
            # experts return zeros for them (ExpertCounts.host None)
            valid = torch.arange(copy_idx.numel(), device=x_TD.device) < counts_E.sum()
            weights = torch.where(valid, weights, 0)
            counts = ExpertCounts(counts_E)
        meta = DispatchMeta(x_TD.shape[0], token_idx, weights)
        overlapped = overlap() if overlap is not None else None
        return gather_rows(x_TD, token_idx), counts, meta, overlapped

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return _combine_local(y_ND, meta)


class AllToAllDispatcher:
    """Experts sharded over `group` (the EP group): rank r holds experts [r*L, (r+1)*L).

    Steps: sort copies by global expert (= by destination rank, local expert); exchange the
    per-expert counts (one small all-to-all, then one device-to-host copy of the sent and received
    counts: the host sync every uneven all-to-all needs); send the rows; regroup what arrived from
    (source, expert) to (expert, source) order so every local expert sees one contiguous slice.
    Combine runs the same steps backwards. Capacity was applied on the source rank, per local
    batch (GShard).
    """

    def __init__(self, num_experts: int, group, ep_rank: int, ep_size: int):
        self.num_experts = num_experts
        self.group = group
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size    # static placement (set_placement: slots)
        self.slots_EC: Optional[torch.Tensor] = None     # set_placement: replica slots of each expert
        self.replicas_E: Optional[torch.Tensor] = None

    def set_placement(self, slots: list, slots_per_rank: int, device) -> None:
        """Send copies to slots (moe.placement=balanced): slots[e] = global slot ids (rank *
        slots_per_rank + local slot) of expert e's replicas (moe/placement.Placement.slots)."""
        width = max(len(s) for s in slots)
        self.slots_EC = torch.tensor([s + s[:1] * (width - len(s)) for s in slots], dtype=torch.int64, device=device)
        self.replicas_E = torch.tensor([len(s) for s in slots], dtype=torch.int64, device=device)
        self.num_local_experts = slots_per_rank

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, overlap: Optional[Callable[[], object]] = None,
                 host_counts: bool = True):
        R, L = self.ep_size, self.num_local_experts
        dest_TK = routing.expert_idx_TK
        if self.slots_EC is not None:
            dest_TK = to_replicas(dest_TK, routing.kept_TK, self.slots_EC, self.replicas_E, self.ep_rank)
        token_idx, copy_idx, counts_E = sort_by_expert(dest_TK, routing.kept_TK, R * L)
        timer = CommTimer()
        start = timer.start(x_TD.device)
        recv_counts_RL = exchange_counts(counts_E.view(R, L), self.group)
        counts_cpu = to_host(torch.stack([counts_E.view(R, L), recv_counts_RL]))   # the one host sync
        timer.stop("counts", start, x_TD.device, counts_E.numel() * 8)
        send_splits = rank_splits(counts_cpu[0].reshape(-1), R).tolist()   # sync ok: host tensor
        recv_splits = counts_cpu[1].sum(1).tolist()                       # sync ok: host tensor
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        token_idx = token_idx[:n_send]
        weights = gather_rows(routing.weights_TK.reshape(-1), copy_idx[:n_send])
        x_send = gather_rows(x_TD, token_idx)
        pending = all_to_all_start(x_send, recv_splits, send_splits, self.group, timer, "dispatch")
        overlapped = overlap() if overlap is not None else None
        x_recv = pending.wait(x_send)
        regroup = regroup_by_expert(recv_counts_RL, n_recv)
        ungroup = invert_permutation(regroup)
        counts = ExpertCounts(recv_counts_RL.sum(0), counts_cpu[1].sum(0).tolist())   # sync ok: host tensor
        meta = DispatchMeta(x_TD.shape[0], token_idx, weights, send_splits, recv_splits, regroup, ungroup, timer)
        return permute_rows(x_recv, regroup, ungroup), counts, meta, overlapped

    def combine(self, y_MD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        y_recv_order = permute_rows(y_MD, meta.ungroup_M, meta.regroup_M)
        y_back = all_to_all(y_recv_order, meta.send_splits, meta.recv_splits, self.group, meta.timer, "combine")
        return _combine_local(y_back, meta)


class RowShardDispatcher:
    """PEER over `group`: rank r holds rows [r*N/ep, (r+1)*N/ep) of the expert tables, retrieval
    is replicated. dispatch all-gathers tokens, gate weights and retrieved ids; combine
    reduce-scatters the partial sums (the gathers' backward is a reduce-scatter of the gradient)."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def dispatch(self, x_TD: torch.Tensor, w_THK: torch.Tensor, ids_THK: torch.Tensor):
        xs = _GatherRows.apply(x_TD, self.group, self.size)
        ws = _GatherRows.apply(w_THK, self.group, self.size)
        ids_all = [torch.empty_like(ids_THK) for _ in range(self.size)]
        dist.all_gather(ids_all, ids_THK.contiguous(), group=self.group)
        return xs, ws, torch.cat(ids_all)

    def combine(self, partial_GD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn import functional as dnn
        out = torch.empty_like(x_TD)
        return dnn.reduce_scatter(out, list(partial_GD.chunk(self.size)), group=self.group)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 within `group`; backward: reduce-scatter of the gradient.
    (torch.distributed.nn's all_gather emulates that backward on gloo with scatters whose source
    is a group rank passed as a global one: it fails in any group other than ranks 0..n-1, e.g.
    the EP groups of dp > ep or tp > 1 layouts.)"""

    @staticmethod
    def forward(ctx, x, group, size: int):
        ctx.group, ctx.size = group, size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        parts = [g.contiguous() for g in grad.chunk(ctx.size)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None, None


@dataclass(frozen=True)
class GroupSum:
    """Sums a tensor over `group` (of `size` ranks) in place: moe.aux_loss_scope=global_batch
    sums each expert's load counts over the data-parallel group."""
    group: object
    size: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t
