"""Pure routing math (moetrain.moe.routing) against hand-worked tensors: softmax top-k
(select_topk), the GShard capacity cut (apply_capacity) and their composition as the Router runs
it, renormalize_kept, the balance, z- and entropy losses.

Every expected value below is written out by hand in the comment next to it; nothing is computed
by calling the function under test a second time.
"""
from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import MoEConfig
from moetrain.moe.router import Router
from moetrain.moe.routing import (Routing, Selection, apply_capacity, expert_capacity, load_balancing_loss,
                                  renormalize_kept, router_entropy, router_z_loss, select_topk)

T_, F_ = True, False


def logits_from_probs(rows) -> torch.Tensor:
    """log of (unnormalized) probabilities: softmax of the result is rows / rows.sum(-1)."""
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def topk_gates(logits, k, normalize):
    sel = select_topk(logits, k, normalize)
    return sel.probs_TE, sel.expert_idx_TK, sel.weights_TK


def cut(idx, num_experts, capacity):
    """kept_TK of apply_capacity for these choices (uniform probs and weights, all active)."""
    idx = torch.tensor(idx) if not torch.is_tensor(idx) else idx
    T, K = idx.shape
    sel = Selection(idx, torch.full((T, K), 1.0 / K), torch.ones(T, K, dtype=torch.bool),
                    torch.full((T, num_experts), 1.0 / num_experts))
    return apply_capacity(sel, num_experts, capacity).kept_TK


def slots(idx, num_experts):
    """Slot of each copy in its expert's buffer, read off the cut: kept at capacity c iff slot < c,
    so slot = (number of capacities 0..T*K that drop the copy) - 1."""
    T, K = torch.as_tensor(idx).shape
    return sum((~cut(idx, num_experts, c)).long() for c in range(T * K + 1)) - 1


def route_topk(logits, top_k, capacity, normalize=True):
    """The token-choice path of the Router for router topk: select, then the capacity cut."""
    sel = select_topk(logits, top_k, normalize)
    return apply_capacity(sel, logits.shape[1], capacity), sel.probs_TE


# --------------------------------------------------------------------------- expert_capacity

@pytest.mark.parametrize("num_tokens, num_experts, top_k, factor, min_cap, expected", [
    (8, 4, 2, 1.0, 0, 4),        # 1.0 * 2 * 8 / 4 = 4 exactly
    (10, 4, 1, 1.25, 0, 4),      # 1.25 * 10 / 4 = 3.125 -> ceil 4
    (10, 4, 2, 1.0, 0, 5),       # 2 * 10 / 4 = 5
    (16, 4, 2, 0.5, 0, 4),       # 0.5 * 2 * 16 / 4 = 4
    (7, 8, 1, 1.0, 0, 1),        # 0.875 -> 1
    (4, 8, 1, 1.0, 4, 4),        # ceil(0.5) = 1 < min_capacity 4
    (4, 8, 2, 1.0, 3, 3),        # ceil(1.0) = 1 < min_capacity 3
    (64, 4, 2, 2.0, 4, 64),      # 2 * 2 * 64 / 4 = 64 > min_capacity
])
def test_expert_capacity_formula(num_tokens, num_experts, top_k, factor, min_cap, expected):
    assert expert_capacity(num_tokens, num_experts, top_k, factor, min_cap) == expected


def test_expert_capacity_none_is_dropless():
    assert expert_capacity(100, 8, 2, None, 4) is None
    assert expert_capacity(0, 8, 2, None, 0) is None


def test_expert_capacity_exact_product_is_not_rounded_up():
    # capacity_factor 1.1, k=1, T=100, E=2: C = 1.1 * 100 / 2 = 55 exactly.
    assert expert_capacity(100, 2, 1, 1.1, 0) == 55
    # capacity_factor 1.1, k=2, T=200, E=8: 1.1 * 2 * 200 / 8 = 55 exactly.
    assert expert_capacity(200, 8, 2, 1.1, 0) == 55


# --------------------------------------------------------------------------- select_topk

def test_topk_gates_values_normalized():
    logits = logits_from_probs([[1, 2, 3, 4],      # probs .1 .2 .3 .4
                                [4, 1, 4, 1],      # probs .4 .1 .4 .1 (tie 0/2)
                                [1, 1, 1, 1]])     # uniform
    probs, idx, w = topk_gates(logits, 2, normalize=True)
    torch.testing.assert_close(probs, torch.tensor([[.1, .2, .3, .4], [.4, .1, .4, .1], [.25, .25, .25, .25]]))
    assert idx.tolist() == [[3, 2], [0, 2], [0, 1]]
    # normalized: .4/.7, .3/.7 ; .4/.8, .4/.8 ; .25/.5, .25/.5
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7], [.5, .5], [.5, .5]]))


def test_topk_gates_values_unnormalized():
    logits = logits_from_probs([[1, 2, 3, 4], [4, 1, 4, 1]])
    probs, idx, w = topk_gates(logits, 2, normalize=False)
    assert idx.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(w, torch.tensor([[.4, .3], [.4, .4]]))
    # raw weights are gathered softmax probabilities
    torch.testing.assert_close(w, probs.gather(1, idx))


def test_topk_gates_top1_keeps_the_raw_probability_even_when_normalizing():
    """k=1 is not renormalized (DeepSeek `top_k > 1 and norm_topk_prob`): a weight of exactly 1 would
    cut the task-loss gradient to the router. Pinned here so a change of convention is deliberate."""
    logits = logits_from_probs([[1, 2, 3, 4], [5, 3, 1, 1]])  # second row: .5 .3 .1 .1
    for normalize in (True, False):
        _, idx, w = topk_gates(logits, 1, normalize=normalize)
        assert idx.tolist() == [[3], [0]]
        torch.testing.assert_close(w, torch.tensor([[.4], [.5]]))


def test_topk_gates_computes_softmax_in_fp32():
    logits = logits_from_probs([[1, 2, 3, 4]]).to(torch.bfloat16)
    probs, _, w = topk_gates(logits, 2, normalize=True)
    assert probs.dtype == torch.float32 and w.dtype == torch.float32


@pytest.mark.parametrize("row, k, expected", [
    ([0., 0., 0., 0., 0., 0., 0., 0.], 3, [0, 1, 2]),   # all tied: lowest ids
    ([0., 2., 2., 2.], 2, [1, 2]),                       # three-way tie for first
    ([3., 1., 3., 3.], 2, [0, 2]),                       # tie skipping a lower, smaller id
    ([1., 5., 5., 1.], 3, [1, 2, 0]),                    # tie for first and for third
    ([-1., 7., 7., 7.], 1, [1]),
])
def test_topk_gates_ties_go_to_lowest_expert_id(row, k, expected):
    _, idx, w = topk_gates(torch.tensor([row]), k, normalize=True)
    assert idx[0].tolist() == expected
    assert torch.all(w[0, :-1] >= w[0, 1:])            # weights in descending order


# --------------------------------------------------------------------------- apply_capacity

# Hand example (E=3, T=4, K=2):
#   t0 -> [0, 1]   t1 -> [0, 2]   t2 -> [1, 0]   t3 -> [0, 1]
# GShard priority (choice-major): first choices t0..t3, then second choices t0..t3.
#   first:  t0->e0 slot0, t1->e0 slot1, t2->e1 slot0, t3->e0 slot2
#   second: t0->e1 slot1, t1->e2 slot0, t2->e0 slot3, t3->e1 slot2
HAND_IDX = [[0, 1], [0, 2], [1, 0], [0, 1]]
HAND_SLOTS = [[0, 1], [1, 0], [0, 3], [2, 2]]


def test_capacity_cut_first_choices_fill_before_second_choices():
    assert slots(HAND_IDX, 3).tolist() == HAND_SLOTS
    kept = cut(HAND_IDX, 3, capacity=3)
    # capacity 3: t3's FIRST choice (slot 2 of e0) is kept and t2's SECOND choice (slot 3) is dropped,
    # although t2 comes first in token order (token-major order would do the opposite).
    assert kept.tolist() == [[T_, T_], [T_, T_], [T_, F_], [T_, T_]]


def test_capacity_cut():
    assert cut(HAND_IDX, 3, capacity=2).tolist() == [[T_, T_], [T_, T_], [T_, F_], [F_, F_]]   # t3 loses both
    # slot 0 only: t0->e0, t2->e1, t1->e2
    assert cut(HAND_IDX, 3, capacity=1).tolist() == [[T_, F_], [F_, T_], [T_, F_], [F_, F_]]


def test_capacity_zero_drops_everything():
    assert not cut(HAND_IDX, 3, capacity=0).any()


def test_dropless_keeps_all():
    kept = cut(HAND_IDX, 3, capacity=None)
    assert kept.all() and kept.shape == (4, 2) and kept.dtype == torch.bool


def test_capacity_all_tokens_to_one_expert_and_empty_experts():
    idx = torch.full((5, 1), 1)                        # E=3; experts 0 and 2 get nothing
    assert slots(idx, 3).tolist() == [[0], [1], [2], [3], [4]]
    assert cut(idx, 3, capacity=2).tolist() == [[T_], [T_], [F_], [F_], [F_]]
    assert cut(idx, 3, capacity=None).all()


def test_capacity_top1_is_token_order():
    idx = torch.tensor([[2], [0], [2], [2], [0], [1]])
    assert slots(idx, 4).view(-1).tolist() == [0, 0, 1, 2, 1, 0]
    assert cut(idx, 4, capacity=2).view(-1).tolist() == [T_, T_, T_, F_, T_, T_]


# --------------------------------------------------------------------------- select + cut

# logits whose top-2 reproduce HAND_IDX
HAND_LOGITS = torch.tensor([[2., 1., 0.], [2., 0., 1.], [1., 2., 0.], [2., 1., 0.]])


def test_route_topk_counts_and_kept():
    routing, probs = route_topk(HAND_LOGITS, 2, capacity=2)
    assert isinstance(routing, Routing)
    assert routing.expert_idx_TK.tolist() == HAND_IDX
    assert routing.kept_TK.tolist() == [[T_, T_], [T_, T_], [T_, F_], [F_, F_]]
    # before the cut: e0 <- t0,t1,t2(2nd),t3 ; e1 <- t0(2nd),t2,t3(2nd) ; e2 <- t1(2nd)
    assert routing.counts_E.tolist() == [4, 3, 1]
    # after: e0 keeps slots 0,1 ; e1 keeps slots 0,1 ; e2 keeps 1
    assert routing.kept_E.tolist() == [2, 2, 1]
    assert routing.capacity == 2 and routing.counts_E.numel() == 3
    torch.testing.assert_close(probs, torch.softmax(HAND_LOGITS, -1))
    # weights are the renormalized probabilities of the chosen experts: e/(e+1), 1/(e+1) for logits 2,1
    e = math.e
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_route_topk_capacity3_and_dropless():
    routing, _ = route_topk(HAND_LOGITS, 2, capacity=3)
    assert routing.counts_E.tolist() == [4, 3, 1]
    assert routing.kept_E.tolist() == [3, 3, 1]
    routing, _ = route_topk(HAND_LOGITS, 2, capacity=None)
    assert routing.kept_TK.all()
    assert routing.kept_E.tolist() == routing.counts_E.tolist() == [4, 3, 1]
    assert routing.capacity is None


def test_route_topk_expert_with_zero_tokens():
    logits = torch.tensor([[0., 5., 0., 0.]] * 3)        # every token's first choice is e1
    routing, _ = route_topk(logits, 1, capacity=2, normalize=False)
    assert routing.counts_E.tolist() == [0, 3, 0, 0]
    assert routing.kept_E.tolist() == [0, 2, 0, 0]
    assert routing.kept_TK.view(-1).tolist() == [T_, T_, F_]


def hand_router(capacity, renormalize=False):
    """Router topk, k = 2, E = 3, identity gate weights (logits = x); capacity = min_capacity
    (the factor is tiny: ceil(1e-6 * 2 * 4 / 3) = 1 <= min_capacity)."""
    moe = MoEConfig(num_experts=3, top_k=2, capacity_factor=1e-6, min_capacity=capacity,
                    renormalize_after_drop=renormalize)
    router = Router(moe, 3)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    return router


def test_router_module_runs_the_same_routing():
    out = hand_router(2)(HAND_LOGITS, None, 1)
    assert out.routing.expert_idx_TK.tolist() == HAND_IDX
    assert out.routing.kept_TK.tolist() == [[T_, T_], [T_, T_], [T_, F_], [F_, F_]]
    assert out.routing.counts_E.tolist() == [4, 3, 1] and out.routing.kept_E.tolist() == [2, 2, 1]
    e = math.e
    torch.testing.assert_close(out.routing.weights_TK[2], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    # balance loss: f = [4, 3, 1] / 8 (before the cut), P = mean of the softmax rows
    P = torch.softmax(HAND_LOGITS, -1).mean(0)
    torch.testing.assert_close(out.aux_loss, 3 * (torch.tensor([4., 3., 1.]) / 8 * P).sum())


# --------------------------------------------------------------------------- renormalize_kept

def test_renormalize_kept_by_hand():
    """w_k kept_k / sum_j w_j kept_j: a lone survivor gets 1, both kept are renormalized (also from
    raw gates: .3, .1 -> .75, .25), every copy dropped -> 0 (DeepSpeed clamps the sum at eps)."""
    r = Routing(torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]),
                torch.tensor([[.6, .4], [.7, .3], [.5, .5], [.3, .1]]),
                torch.tensor([[T_, F_], [T_, T_], [F_, F_], [T_, T_]]),
                torch.tensor([3, 2, 3]), torch.tensor([2, 1, 2]), 2)
    out = renormalize_kept(r)
    torch.testing.assert_close(out.weights_TK, torch.tensor([[1., 0.], [.7, .3], [0., 0.], [.75, .25]]))
    assert out.kept_TK is r.kept_TK and out.expert_idx_TK is r.expert_idx_TK


def test_renormalize_after_drop_gives_the_survivor_weight_one():
    """HAND_LOGITS at capacity 2: each token's top-2 logits are 2 and 1 -> GShard weights
    e/(e+1), 1/(e+1). t2 keeps only its first copy, t3 none. moe.renormalize_after_drop (DeepSpeed):
    t2 -> [1, 0], t3 -> [0, 0]; t0, t1 (both kept) unchanged. Default (GShard): unchanged."""
    e = math.e
    g = [e / (e + 1), 1 / (e + 1)]
    plain = hand_router(2)(HAND_LOGITS, None, 1).routing
    torch.testing.assert_close(plain.weights_TK, torch.tensor([g, g, g, g]))
    renorm = hand_router(2, renormalize=True)(HAND_LOGITS, None, 1).routing
    assert renorm.kept_TK.tolist() == plain.kept_TK.tolist()
    torch.testing.assert_close(renorm.weights_TK, torch.tensor([g, g, [1., 0.], [0., 0.]]))
    # nothing dropped (capacity 4): the same weights as GShard's
    torch.testing.assert_close(hand_router(4, renormalize=True)(HAND_LOGITS, None, 1).routing.weights_TK,
                               torch.tensor([g, g, g, g]))


# --------------------------------------------------------------------------- load_balancing_loss

def test_load_balancing_loss_uniform_is_one():
    E, T = 4, 6
    probs = torch.full((T, E), 1 / E)
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    torch.testing.assert_close(load_balancing_loss(probs, idx), torch.tensor(1.0))


def test_load_balancing_loss_all_to_one_is_num_experts():
    E, T = 4, 5
    probs = torch.zeros(T, E)
    probs[:, 2] = 1.0
    idx = torch.full((T, 1), 2)
    torch.testing.assert_close(load_balancing_loss(probs, idx), torch.tensor(4.0))


def test_load_balancing_loss_hand_example():
    # T=2, E=3, K=2: counts [1, 2, 1] / 4 = f = [.25, .5, .25]; P = mean rows = [.3, .45, .25]
    # loss = 3 * (.25*.3 + .5*.45 + .25*.25) = 3 * .3625 = 1.0875
    probs = torch.tensor([[.5, .3, .2], [.1, .6, .3]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2]])
    loss = load_balancing_loss(probs, idx)
    torch.testing.assert_close(loss, torch.tensor(1.0875, dtype=torch.float64))
    # the gradient flows to probs only (f is a count): d loss / d probs[t, e] = E * f_e / T
    loss.backward()
    expected = torch.tensor([[.375, .75, .375]] * 2, dtype=torch.float64)
    torch.testing.assert_close(probs.grad, expected)


def test_load_balancing_loss_top1_hand_example():
    # T=2, E=2, K=1 both to e0: f = [1, 0], P = [.55, .45] -> 2 * .55 = 1.1
    probs = torch.tensor([[.7, .3], [.4, .6]])
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([[0], [0]])), torch.tensor(1.1))


def test_load_balancing_loss_gradient_reaches_logits_through_probs():
    logits = torch.tensor([[1., 0., -1.], [0., 2., 0.]], requires_grad=True)
    probs = torch.softmax(logits, -1)
    _, idx, _ = topk_gates(logits.detach(), 1, normalize=False)
    load_balancing_loss(probs, idx).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------- z-loss, entropy

def test_router_z_loss_hand_values():
    # logsumexp([0, 0]) = ln 2 ; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 ; mean of squares = 2.5 ln^2 2
    logits = torch.tensor([[0., 0.], [math.log(3.), 0.]])
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2) ** 2))
    # one row of logits [1, 1, 1, 1]: lse = 1 + ln 4
    torch.testing.assert_close(router_z_loss(torch.ones(1, 4)), torch.tensor((1 + math.log(4)) ** 2))


def test_router_z_loss_gradient():
    # d/dl (lse^2)/T = 2 lse softmax(l) / T ; for rows [0, 0] (T=1): 2 ln2 * [.5, .5] = [ln2, ln2]
    logits = torch.zeros(1, 2, requires_grad=True)
    router_z_loss(logits).backward()
    torch.testing.assert_close(logits.grad, torch.full((1, 2), math.log(2)))


def test_router_entropy_hand_values():
    # rows: [.5, .5] -> ln 2 ; [1, 0] -> 0 (0 * log 0 taken as 0) ; mean = ln2 / 2
    probs = torch.tensor([[.5, .5], [1., 0.]])
    torch.testing.assert_close(router_entropy(probs), torch.tensor(math.log(2) / 2))
    torch.testing.assert_close(router_entropy(torch.full((3, 8), 1 / 8)), torch.tensor(math.log(8)))
    # [.25 .25 .5]: -(2 * .25 ln .25 + .5 ln .5) = 1.5 ln 2
    torch.testing.assert_close(router_entropy(torch.tensor([[.25, .25, .5]])), torch.tensor(1.5 * math.log(2)))
