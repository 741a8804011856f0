"""Pure routing math: router logits -> which experts, with what weights, in which buffer slot.

No process groups, no module state: every function maps tensors and ints to tensors, so each
formula can be checked against hand-worked values (tests/moe/test_routing.py).

Shape legend: T tokens (local batch, flattened), E experts, K choices per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens.

    expert_idx_TK: chosen global expert ids, column 0 is the first choice.
    weights_TK:    combine weights (gate values) for each choice.
    kept_TK:       False where the copy overflowed its expert's capacity (it then rides the residual).
    counts_E:      copies routed to each expert before the capacity cut.
    kept_E:        copies each expert actually receives.
    """
    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    counts_E: torch.Tensor
    kept_E: torch.Tensor
    capacity: Optional[int]

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: Optional[float], min_capacity: int) -> Optional[int]:
    """C = max(min_capacity, ceil(capacity_factor * k * T / E)); None (dropless) when factor is None."""
    if capacity_factor is None:
        return None
    # the epsilon keeps an exact product (1.1 * 100 / 2 = 55.000000000000007) from rounding up
    return max(min_capacity, math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9))


def topk_gates(logits_TE: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs = softmax(logits) over all E (in fp32); pick the k largest (ties: lowest expert id).

    Returns (probs_TE, expert_idx_TK, weights_TK). With `normalize` the k weights are divided by
    their sum (GShard/Mixtral); without it, and always for k = 1, they are the raw softmax
    probabilities (Switch: a top-1 weight of 1.0 would leave the router without a gradient).
    """
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    # torch.topk breaks ties by position on CPU but not on every backend: _stable_topk makes ties
    # deterministic (lowest id wins) without changing any non-tied order.
    weights_TK, expert_idx_TK = _stable_topk(probs_TE, top_k)
    if normalize and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return probs_TE, expert_idx_TK, weights_TK


def _stable_topk(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k in descending order, ties broken toward the lower index, on every device, without a
    host sync (no data-dependent branch or shape).

    Each fp32 score is mapped to an int32 whose order is the float order (the IEEE bits, with the
    magnitude bits flipped for negatives; -0.0 is folded into +0.0 first), then combined with the
    expert index into one int64 key  key * E + (E - 1 - e)  that is unique per row: one topk over
    the keys gives the (value desc, index asc) order exactly.
    """
    E = scores_TE.shape[-1]
    f = scores_TE.float() + 0.0                       # -0.0 + 0.0 = +0.0: equal values, equal keys
    bits = f.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    rev_idx = torch.arange(E - 1, -1, -1, device=scores_TE.device)
    idx = torch.topk(ordered * E + rev_idx, k, dim=-1).indices
    return scores_TE.gather(-1, idx), idx


def count_ids(ids: torch.Tensor, n: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many entries of `ids` (optionally only where `mask`) equal each of 0..n-1 -> int64 [n].

    bincount needs a host sync on CUDA (it reads the max id to size its output) and boolean-mask
    selection another (nonzero); a scatter-add of ones into [n] needs neither, and integer sums
    are exact in any order. ids must lie in 0..n-1 (also where masked out).
    """
    flat = ids.reshape(-1)
    ones = torch.ones_like(flat) if mask is None else mask.reshape(-1).to(flat.dtype)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, ones.to(torch.int64))


def assign_slots(expert_idx_TK: torch.Tensor, num_experts: int,
                 capacity: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each copy in its expert's buffer, first choices before second choices (GShard).

    Priority order is choice-major: all k=0 copies in token order, then all k=1 copies, ...
    slot(t, k) = number of copies to the same expert that come earlier in that order.
    Returns (slot_TK, kept_TK) with kept = slot < capacity (all True when capacity is None).
    """
    T, K = expert_idx_TK.shape
    flat = expert_idx_TK.t().reshape(-1)                        # choice-major order, [K*T]
    slot_flat = _slots_by_sort(flat)
    slot_TK = slot_flat.view(K, T).t()
    if capacity is None:
        kept_TK = torch.ones_like(slot_TK, dtype=torch.bool)
    else:
        kept_TK = slot_TK < capacity
    return slot_TK, kept_TK


def _slots_by_sort(flat: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among equal expert ids, in order: a stable sort, O(N log N), no [N, E]
    one-hot and no host sync (each sorted entry's group starts where searchsorted finds its id)."""
    sorted_ids, order = torch.sort(flat, stable=True)
    starts = torch.searchsorted(sorted_ids, sorted_ids)
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts
    return torch.empty_like(flat).scatter_(0, order, rank_sorted)


def route_topk(logits_TE: torch.Tensor, top_k: int, capacity: Optional[int],
               normalize: bool = True) -> tuple[Routing, torch.Tensor]:
    """Softmax top-k routing with a per-expert capacity. Returns (routing, probs_TE)."""
    num_experts = logits_TE.shape[-1]
    probs_TE, expert_idx_TK, weights_TK = topk_gates(logits_TE, top_k, normalize)
    _, kept_TK = assign_slots(expert_idx_TK, num_experts, capacity)
    counts_E = count_ids(expert_idx_TK, num_experts)
    kept_E = count_ids(expert_idx_TK, num_experts, kept_TK)
    return Routing(expert_idx_TK, weights_TK, kept_TK, counts_E, kept_E, capacity), probs_TE


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss  E * sum_e f_e * P_e.

    f_e = (copies routed to e, before capacity) / (T * K)   -- not differentiable
    P_e = mean over tokens of probs[:, e]                    -- carries the gradient
    Equals 1 for perfectly uniform routing, E when everything goes to one expert.
    """
    T, E = probs_TE.shape
    counts_E = count_ids(expert_idx_TK, E).to(probs_TE.dtype)
    f_E = counts_E / max(1, expert_idx_TK.numel())
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = undecided)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
