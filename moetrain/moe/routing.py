"""Pure routing math: router logits (and noise, biases, uniform draws passed in) -> which experts,
with what weights, in which buffer slot; the balance losses.

    select_topk          softmax top-k (Mixtral/GShard-style weights; Switch = k 1, raw prob)
    select_gshard        GShard top-2 with random routing of the second expert
    select_noisy_topk    Shazeer et al. 2017: noisy logits, softmax over the kept k
    select_biased        DeepSeek-V3 aux-loss-free: sigmoid scores, bias only for the choice
    route_expert_choice  Zhou et al. 2022: each expert takes its top-C tokens
    apply_capacity       GShard buffer priority, optional reroute of overflow to the next-best expert
    renormalize_kept     DeepSpeed top-2: the surviving copies' weights renormalized after the cut

No process groups, no module state, no random draws: every function maps tensors and ints to
tensors, so each formula is checked against hand-worked values (tests/moe/test_routing.py,
test_routers.py). moetrain.moe.router holds the module and the registry that calls them.

Shape legend: T tokens (local batch, flattened), E experts (FFN experts first, then any
zero-computation experts), K choices per token, F FFN experts (capacity applies to these only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Selection:
    """Choices before capacity. active_TK False = choice not dispatched at all (GShard's random
    skip of the second expert); probs_TE is what the balance loss uses."""
    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    active_TK: torch.Tensor
    probs_TE: torch.Tensor
    scores_TE: Optional[torch.Tensor] = None   # what the method ranks experts by (default: probs)

    def preference_TE(self) -> torch.Tensor:
        """Each token's experts, best first, by the method's own ranking score (for reroute)."""
        scores = self.scores_TE if self.scores_TE is not None else self.probs_TE
        return torch.argsort(scores, dim=-1, descending=True, stable=True)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: Optional[float], min_capacity: int) -> Optional[int]:
    """C = max(min_capacity, ceil(capacity_factor * k * T / E)); None (dropless) when factor is None."""
    if capacity_factor is None:
        return None
    # the epsilon keeps an exact product (1.1 * 100 / 2 = 55.000000000000007) from rounding up
    return max(min_capacity, math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9))


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


def _slots_by_sort(flat: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among equal expert ids, in order: a stable sort, O(N log N), no [N, E]
    one-hot and no host sync (each sorted entry's group starts where searchsorted finds its id)."""
    sorted_ids, order = torch.sort(flat, stable=True)
    starts = torch.searchsorted(sorted_ids, sorted_ids)
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts
    return torch.empty_like(flat).scatter_(0, order, rank_sorted)


def select_topk(logits_TE: torch.Tensor, top_k: int, normalize: bool) -> Selection:
    """probs = softmax(logits) over all E (in fp32); pick the k largest (ties: lowest expert id).

    With `normalize` the k weights are divided by their sum (GShard/Mixtral); without it, and
    always for k = 1, they are the raw softmax probabilities (Switch: a top-1 weight of 1.0 would
    leave the router without a gradient).
    """
    probs = torch.softmax(logits_TE.float(), dim=-1)
    w, idx = _stable_topk(probs, top_k)
    if normalize and top_k > 1:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return Selection(idx, w, torch.ones_like(idx, dtype=torch.bool), probs)


def select_gshard(logits_TE: torch.Tensor, uniform_T: torch.Tensor) -> Selection:
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1).

    g1, g2 = the two largest softmax gates renormalized by g1 + g2; the first expert is always
    dispatched, the second only where 2 * g2 > u, u ~ U(0, 1) (so with probability min(1, 2*g2)).
    """
    sel = select_topk(logits_TE, 2, True)
    active = sel.active_TK.clone()
    active[:, 1] = 2 * sel.weights_TK[:, 1] > uniform_T.to(sel.weights_TK.dtype)
    return replace(sel, active_TK=active)


def select_noisy_topk(clean_TE: torch.Tensor, noise_std_TE: torch.Tensor, normal_TE: Optional[torch.Tensor],
                      top_k: int) -> tuple[Selection, torch.Tensor]:
    """Shazeer et al. 2017: H = clean + N(0,1) * noise_std (noise_std = softplus(x W_noise));
    G = softmax(KeepTopK(H, k)). normal_TE None (eval) means no noise. Returns (selection, H)."""
    noisy = clean_TE.float() if normal_TE is None else clean_TE.float() + normal_TE * noise_std_TE.float()
    top_vals, idx = _stable_topk(noisy, top_k)
    w = torch.softmax(top_vals, dim=-1)
    gates_TE = torch.zeros_like(noisy).scatter(1, idx, w)
    return Selection(idx, w, torch.ones_like(idx, dtype=torch.bool), gates_TE, noisy), noisy


def select_biased(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> Selection:
    """DeepSeek-V3 aux-loss-free: s = sigmoid(logits); choose top-k of s + b; weights = the
    chosen s (without b) normalized to sum 1. The bias steers selection only, never the output."""
    scores = torch.sigmoid(logits_TE.float())
    biased = scores + bias_E.float()
    _, idx = _stable_topk(biased, top_k)
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return Selection(idx, w, torch.ones_like(idx, dtype=torch.bool), torch.softmax(logits_TE.float(), -1), biased)


def route_expert_choice(logits_TE: torch.Tensor, capacity: int) -> tuple[Routing, torch.Tensor]:
    """Zhou et al. 2022: S = softmax over experts per token; expert e takes the C tokens with the
    largest S[:, e] (ties: lower token index). A token may be taken by 0..E experts; its output
    is the S-weighted sum over the experts that took it.

    Represented in the common Routing form with K = E columns (column e = expert e), kept where
    expert e chose the token. Note: choosing over a batch lets a token's routing depend on later
    tokens of the batch (not causal) - the known caveat of expert choice in decoder LMs.
    """
    T, E = logits_TE.shape
    probs = torch.softmax(logits_TE.float(), dim=-1)
    C = min(capacity, T)
    order = torch.argsort(probs.t(), dim=-1, descending=True, stable=True)[:, :C]   # [E, C] token ids
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=logits_TE.device)
    chosen_TE[order, torch.arange(E, device=logits_TE.device)[:, None].expand(E, C)] = True
    idx = torch.arange(E, device=logits_TE.device).expand(T, E).contiguous()
    kept_E = chosen_TE.sum(0)
    return Routing(idx, probs, chosen_TE, kept_E.clone(), kept_E, C), probs


def apply_capacity(sel: Selection, num_ffn_experts: int, capacity: Optional[int],
                   reroute_pref_TE: Optional[torch.Tensor] = None) -> Routing:
    """Capacity cut with GShard priority: all first choices in token order, then all second
    choices, ...; slot(t, k) = copies to the same expert earlier in that order, kept where
    slot < capacity (all kept when capacity is None). Inactive copies take no slot and are never
    kept; zero-computation experts (ids >= F) take no capacity and are always kept.

    With reroute_pref_TE (each token's experts in preference order, best first), a copy that
    overflowed goes to its next-best FFN expert that still has room and that the token does not
    already use, keeping its gate weight; rounds continue while some copy can still move. The
    reroute rounds are data-dependent (two host syncs per round on a GPU); everything else here is
    sync-free.
    """
    idx, active = sel.expert_idx_TK, sel.active_TK
    T, K = idx.shape
    E = sel.probs_TE.shape[1]
    ffn = idx < num_ffn_experts
    counted = active & ffn
    # inactive / zero-compute copies get the sentinel key F so they take no slot
    key = torch.where(counted, idx, torch.full_like(idx, num_ffn_experts))
    slot = _slots_by_sort(key.t().reshape(-1)).view(K, T).t()
    kept = active & (~ffn | (slot < capacity if capacity is not None else torch.ones_like(ffn)))
    if capacity is not None and reroute_pref_TE is not None:
        idx, kept = _reroute(idx, kept, counted, reroute_pref_TE, num_ffn_experts, capacity)
    counts_E = count_ids(sel.expert_idx_TK, E, active)
    kept_E = count_ids(idx, E, kept)
    return Routing(idx, sel.weights_TK, kept, counts_E, kept_E, capacity)


def _reroute(idx, kept, counted, pref_TE, F_, capacity):
    T, K = idx.shape
    idx = idx.clone()
    kept = kept.clone()
    fill = torch.bincount(idx[kept & (idx < F_)], minlength=F_)
    pending = counted & ~kept                            # overflowed copies
    used = torch.zeros(T, F_ + 1, dtype=torch.bool, device=idx.device)
    used.scatter_(1, torch.where(idx < F_, idx, F_), True)
    pref = torch.where(pref_TE < F_, pref_TE, torch.full_like(pref_TE, F_))
    ptr = torch.zeros(T, K, dtype=torch.long, device=idx.device)
    # terminates: every round each token with a pending copy advances a pointer or settles a copy
    while bool(pending.any()):
        t_ids, k_ids = torch.nonzero(pending, as_tuple=True)     # sync ok: reroute rounds (documented)
        # advance each pending copy's pointer past experts the token already uses or that are full
        cand = pref[t_ids, ptr[t_ids, k_ids].clamp_max(pref.shape[1] - 1)]
        exhausted = ptr[t_ids, k_ids] >= pref.shape[1]
        full_or_used = (cand == F_) | used[t_ids, cand] | (fill[cand.clamp_max(F_ - 1)] >= capacity)
        skip = full_or_used & ~exhausted
        ptr[t_ids[skip], k_ids[skip]] += 1
        pending[t_ids[exhausted], k_ids[exhausted]] = False
        try_mask = ~full_or_used & ~exhausted
        if not bool(try_mask.any()):
            continue
        t_try, k_try, c_try = t_ids[try_mask], k_ids[try_mask], cand[try_mask]
        # one copy per token per round (two copies of a token must not land on one expert):
        # keep each token's lowest choice column
        order = torch.argsort(t_try * K + k_try)
        t_try, k_try, c_try = t_try[order], k_try[order], c_try[order]
        first = torch.ones_like(t_try, dtype=torch.bool)
        first[1:] = t_try[1:] != t_try[:-1]
        t_try, k_try, c_try = t_try[first], k_try[first], c_try[first]
        # GShard priority inside an expert: lower choice column first, then token order
        order = torch.argsort(k_try * T + t_try)
        t_try, k_try, c_try = t_try[order], k_try[order], c_try[order]
        rank_in_expert = _slots_by_sort(c_try)
        accept = rank_in_expert < (capacity - fill[c_try])
        t_a, k_a, c_a = t_try[accept], k_try[accept], c_try[accept]
        idx[t_a, k_a] = c_a
        kept[t_a, k_a] = True
        pending[t_a, k_a] = False
        used[t_a, c_a] = True
        fill += torch.bincount(c_a, minlength=F_)
        rejected = ~accept
        ptr[t_try[rejected], k_try[rejected]] += 1
    return idx, kept


def renormalize_kept(routing: Routing) -> Routing:
    """DeepSpeed's top-2 renormalization after the capacity cut (moe.renormalize_after_drop):
    w_k <- w_k kept_k / max(sum_j w_j kept_j, eps), so a token's surviving copy of two carries
    weight 1 where GShard keeps g/(g1 + g2), and a token with every copy dropped gets weights 0."""
    w = routing.weights_TK * routing.kept_TK
    denom = w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    return replace(routing, weights_TK=w / denom)


def balance_loss_from_counts(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_copies: float) -> torch.Tensor:
    """Switch/GShard balance loss  E * sum_e f_e * P_e.

    f_e = counts_E / num_copies (copies routed to e before capacity; not differentiable; summed
          over the data-parallel group by the caller for aux_loss_scope=global_batch)
    P_e = mean over this rank's tokens of probs[:, e]        -- carries the gradient
    Equals 1 for perfectly uniform routing, E when everything goes to one expert.
    """
    E = probs_TE.shape[1]
    return E * torch.sum(counts_E.to(probs_TE.dtype) / max(1, num_copies) * probs_TE.mean(0))


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """The balance loss of this micro batch's own choices (f from count_ids of expert_idx_TK)."""
    return balance_loss_from_counts(probs_TE, count_ids(expert_idx_TK, probs_TE.shape[1]), expert_idx_TK.numel())


def sequence_balance_loss(probs_BSE: torch.Tensor, expert_idx_BSK: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3): the Switch loss per sequence, averaged."""
    B, S, E = probs_BSE.shape
    counts = torch.zeros(B, E, device=probs_BSE.device, dtype=probs_BSE.dtype)
    counts.scatter_add_(1, expert_idx_BSK.reshape(B, -1), torch.ones_like(expert_idx_BSK.reshape(B, -1), dtype=probs_BSE.dtype))
    f = counts / expert_idx_BSK.shape[1] / expert_idx_BSK.shape[2]
    return (E * (f * probs_BSE.mean(1)).sum(-1)).mean()


def gshard_aux_loss(probs_TE: torch.Tensor, first_idx_T: torch.Tensor) -> torch.Tensor:
    """GShard l_aux = mean_e(c_e / S * m_e) * E^2, c_e = first-choice counts, m_e = mean gate."""
    T, E = probs_TE.shape
    c_E = count_ids(first_idx_T, E).to(probs_TE.dtype)
    m_E = probs_TE.mean(0)
    return torch.mean(c_E / T * m_E) * E * E


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x)/mean(x)^2 (population variance), 0 for one element."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var(unbiased=False) / (x.float().mean().square() + 1e-10)


def noisy_topk_losses(gates_TE: torch.Tensor, clean_TE: torch.Tensor, noisy_TE: torch.Tensor,
                      noise_std_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance loss CV(Importance)^2, load loss CV(Load)^2), unweighted.

    Importance_e = sum_x G(x)_e. Load_e = sum_x P(x, e), the smooth estimate of the number of
    tokens routed to e: P(x, e) = Phi((clean_e - kth_excluding(H, k, e)) / noise_std_e), where
    kth_excluding is the k-th largest noisy logit among the other experts: the (k+1)-th largest
    overall if e is in the top k, else the k-th largest.
    """
    importance = gates_TE.sum(0)
    E = noisy_TE.shape[1]
    if top_k >= E:
        return cv_squared(importance), cv_squared(importance.detach() * 0 + 1)
    top_vals = torch.topk(noisy_TE, top_k + 1, dim=-1).values
    kth = top_vals[:, top_k - 1:top_k]          # k-th largest
    kth_plus = top_vals[:, top_k:top_k + 1]     # (k+1)-th largest
    in_top = noisy_TE >= kth
    threshold = torch.where(in_top, kth_plus, kth)
    # the standard normal CDF (torch.distributions.Normal would validate its argument: a host sync)
    prob = torch.special.ndtr((clean_TE.float() - threshold) / noise_std_TE.float().clamp_min(1e-9))
    return cv_squared(importance), cv_squared(prob.sum(0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = undecided)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()


def aux_free_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_e <- b_e + gamma * sign(mean_load - load_e): underloaded experts become more attractive."""
    load = load_E.to(bias_E.dtype)
    return bias_E + gamma * torch.sign(load.mean() - load)
