"""MoELayer (router + LocalDispatcher + GroupedExperts [+ shared]) against a naive per-token loop.

The reference below shares no code with moetrain.moe: softmax, top-k with lowest-id ties,
renormalization, the GShard capacity priority (all first choices in token order, then all second
choices, ...) and the SwiGLU experts are all written out in plain Python over single tokens.
Everything runs in float64; the layer computes its routing probabilities in float32 by design,
which is why the tolerances are 1e-5 relative rather than 1e-12.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import MoEConfig
from moetrain.moe.layer import MoEAux, MoELayer
from moetrain.moe.routing import load_balancing_loss, router_entropy, router_z_loss

D, H, E = 8, 6, 4
B, S = 2, 8
T = B * S
TOL = dict(rtol=1e-5, atol=1e-6)


def make_layer(top_k, capacity_factor, impl, shared=0, normalize=True, seed=0, router="topk"):
    moe = MoEConfig(num_experts=E, top_k=top_k, capacity_factor=capacity_factor, min_capacity=0, router=router,
                    shared_experts=shared, norm_topk_prob=normalize, grouped_mm=impl)
    layer = MoELayer(moe, D, H)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # router weights a bit larger so the gates are far from uniform (and from ties)
    with torch.no_grad():
        layer.router.weight.mul_(10)
    return layer.double()


def make_input(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g, dtype=torch.float64)


def swiglu(x_D, w1_DH, w3_DH, w2_HD):
    return (F.silu(x_D @ w1_DH) * (x_D @ w3_DH)) @ w2_HD


def reference_moe(layer: MoELayer, x_BSD, top_k, capacity_factor, normalize, min_capacity=0):
    """Per-token loop. Returns (y_BSD, kept as {(t, j): bool}, choices [[e]*k], probs_TE, logits_TE)."""
    x_TD = x_BSD.reshape(T, D)
    W_r = layer.router.weight                      # [E, D]
    ex = layer.experts
    capacity = None if capacity_factor is None else max(min_capacity, math.ceil(capacity_factor * top_k * T / E))
    logits, probs, choices, weights = [], [], [], []
    for t in range(T):
        lg = torch.stack([x_TD[t] @ W_r[e] for e in range(E)])
        z = torch.exp(lg - lg.max())
        p = z / z.sum()
        order = sorted(range(E), key=lambda e: (-float(p[e].detach()), e))[:top_k]
        w = [p[e] for e in order]
        if normalize and top_k > 1:
            tot = sum(w)
            w = [wi / tot for wi in w]
        logits.append(lg)
        probs.append(p)
        choices.append(order)
        weights.append(w)
    fill = [0] * E
    kept = {}
    for j in range(top_k):                          # GShard: choice-major priority
        for t in range(T):
            e = choices[t][j]
            kept[t, j] = capacity is None or fill[e] < capacity
            fill[e] += 1
    rows = []
    for t in range(T):
        y = x_TD.new_zeros(D)
        for j in range(top_k):
            if kept[t, j]:
                e = choices[t][j]
                y = y + weights[t][j] * swiglu(x_TD[t], ex.w1[e], ex.w3[e], ex.w2[e])
        if layer.shared is not None:
            sh = layer.shared
            y = y + sh.w2.weight @ (F.silu(sh.w1.weight @ x_TD[t]) * (sh.w3.weight @ x_TD[t]))
        rows.append(y)
    return torch.stack(rows).view(B, S, D), kept, choices, torch.stack(probs), torch.stack(logits)


def grads_of(out, params, x, G):
    return torch.autograd.grad((out * G).sum(), [x] + params)


CASES = [
    # (top_k, capacity_factor, normalize)
    (1, 0.5, True),
    (1, None, True),
    (2, 0.5, True),
    (2, None, True),
    (2, 0.5, False),
    (3, 0.75, True),
]


@pytest.mark.parametrize("impl", ["loop", "bmm"])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("top_k, capacity_factor, normalize", CASES)
def test_layer_matches_per_token_reference(top_k, capacity_factor, normalize, shared, impl):
    layer = make_layer(top_k, capacity_factor, impl, shared=shared, normalize=normalize)
    x = make_input().requires_grad_(True)
    y, aux = layer(x)
    y_ref, kept, _, _, _ = reference_moe(layer, x, top_k, capacity_factor, normalize)
    if capacity_factor is not None:
        assert not all(kept.values()), "test setup: this capacity should drop some copies"
    else:
        assert all(kept.values())
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **TOL)

    params = [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]
    if layer.shared is not None:
        params += [layer.shared.w1.weight, layer.shared.w3.weight, layer.shared.w2.weight]
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = grads_of(y, params, x, G)
    want = grads_of(y_ref, params, x, G)
    names = ["x", "router", "w1", "w3", "w2", "shared.w1", "shared.w3", "shared.w2"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    # the task loss trains the router through the gate weights (top-1 keeps the raw probability)
    assert got[1].abs().sum() > 0


def test_switch_router_uses_raw_probability():
    layer = make_layer(1, None, "loop", router="switch")
    x = make_input()
    y, _ = layer(x)
    y_ref, *_ = reference_moe(layer, x, 1, None, normalize=False)
    torch.testing.assert_close(y, y_ref, **TOL)


@pytest.mark.parametrize("impl", ["loop", "bmm"])
@pytest.mark.parametrize("top_k, capacity_factor", [(1, 0.5), (2, 0.5), (2, None)])
def test_aux_is_consistent_with_reference(top_k, capacity_factor, impl):
    layer = make_layer(top_k, capacity_factor, impl)
    x = make_input()
    _, aux = layer(x)
    assert isinstance(aux, MoEAux)
    _, kept, choices, probs, logits = reference_moe(layer, x, top_k, capacity_factor, True)
    counts = [0] * E
    kept_E = [0] * E
    for (t, j), k in kept.items():
        counts[choices[t][j]] += 1
        kept_E[choices[t][j]] += int(k)
    assert aux.counts_E.tolist() == counts
    assert aux.kept_E.tolist() == kept_E
    assert int(aux.counts_E.sum()) == T * top_k == aux.num_copies
    assert aux.recv_tokens == sum(kept_E) == int(aux.kept_E.sum())
    assert torch.all(aux.kept_E <= aux.counts_E)
    if capacity_factor is not None:
        assert int(aux.kept_E.max()) <= math.ceil(capacity_factor * top_k * T / E)
    f = torch.tensor(counts, dtype=torch.float64) / (T * top_k)
    torch.testing.assert_close(aux.aux_loss.double(), E * (f * probs.mean(0)).sum(), **TOL)
    torch.testing.assert_close(aux.z_loss.double(), (torch.logsumexp(logits, -1) ** 2).mean(), **TOL)
    torch.testing.assert_close(aux.entropy.double(), -(probs * probs.log()).sum(-1).mean(), **TOL)
    # and the layer used the library functions consistently
    torch.testing.assert_close(aux.aux_loss, load_balancing_loss(probs.float(), torch.tensor(choices)), **TOL)
    torch.testing.assert_close(aux.z_loss, router_z_loss(logits), **TOL, check_dtype=False)
    torch.testing.assert_close(aux.entropy, router_entropy(probs.float()), **TOL)


def test_aux_losses_are_differentiable_to_the_router():
    layer = make_layer(2, 0.5, "loop")
    _, aux = layer(make_input())
    (aux.aux_loss + aux.z_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None          # aux losses do not touch the experts


def force_one_expert(layer, expert):
    """Make every token pick `expert` first: a constant feature 0 and a router that reads only it."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[expert, 0] = 50.0


def constant_feature_input():
    x = make_input()
    x[..., 0] = 1.0
    return x


@pytest.mark.parametrize("impl", ["loop", "bmm"])
def test_fully_dropped_tokens_get_exactly_zero(impl):
    # top-1, all 16 tokens to expert 2, capacity ceil(1.0 * 16 / 4) = 4: tokens 4..15 dropped
    layer = make_layer(1, 1.0, impl)
    force_one_expert(layer, 2)
    x = constant_feature_input().requires_grad_(True)
    y, aux = layer(x)
    assert aux.counts_E.tolist() == [0, 0, 16, 0]
    assert aux.kept_E.tolist() == [0, 0, 4, 0]
    y_TD = y.reshape(T, D)
    assert torch.count_nonzero(y_TD[4:]) == 0
    assert torch.all(y_TD[:4].abs().sum(-1) > 0)
    y_ref, *_ = reference_moe(layer, x, 1, 1.0, True)
    torch.testing.assert_close(y, y_ref, **TOL)
    # dropped tokens get no gradient through the layer, kept ones do
    (g_x,) = torch.autograd.grad(y.sum(), [x])
    g_TD = g_x.reshape(T, D)
    assert torch.count_nonzero(g_TD[4:]) == 0 and torch.count_nonzero(g_TD[:4]) > 0


@pytest.mark.parametrize("impl", ["loop", "bmm"])
def test_top2_all_to_one_expert_second_choice_ties_go_to_lowest_id(impl):
    # first choice e3 for everyone; the other three logits are 0 -> second choice e0 (lowest id)
    layer = make_layer(2, None, impl)
    force_one_expert(layer, 3)
    x = constant_feature_input().requires_grad_(True)
    y, aux = layer(x)
    assert aux.counts_E.tolist() == [T, 0, 0, T]
    assert aux.kept_E.tolist() == [T, 0, 0, T]
    y_ref, _, choices, _, _ = reference_moe(layer, x, 2, None, True)
    assert all(c == [3, 0] for c in choices)
    torch.testing.assert_close(y, y_ref, **TOL)


@pytest.mark.parametrize("impl", ["loop", "bmm"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_all_tokens_to_one_expert(impl, capacity_factor):
    layer = make_layer(1, capacity_factor, impl)
    force_one_expert(layer, 1)
    x = constant_feature_input().requires_grad_(True)
    y, aux = layer(x)
    cap = T if capacity_factor is None else math.ceil(capacity_factor * T / E)   # 16 or 2
    assert aux.counts_E.tolist() == [0, T, 0, 0]
    assert aux.kept_E.tolist() == [0, cap, 0, 0]
    assert aux.recv_tokens == cap
    y_ref, *_ = reference_moe(layer, x, 1, capacity_factor, True)
    torch.testing.assert_close(y, y_ref, **TOL)
    y.sum().backward()
    # idle experts get zero (not missing) gradients; the busy one a non-zero one
    for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
        assert w.grad is not None
        assert torch.count_nonzero(w.grad[[0, 2, 3]]) == 0
        assert torch.count_nonzero(w.grad[1]) > 0


def test_loop_and_bmm_agree_in_float32():
    torch.manual_seed(0)
    ys = []
    for impl in ("loop", "bmm"):
        layer = make_layer(2, 0.5, impl).float()
        y, _ = layer(make_input().float())
        ys.append(y)
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-6)


def test_shared_expert_applies_to_dropped_tokens_too():
    layer = make_layer(1, 1.0, "loop", shared=1)
    force_one_expert(layer, 0)
    x = constant_feature_input()
    y, _ = layer(x)
    sh = layer.shared
    x_TD = x.reshape(T, D)
    shared_only = sh.w2(F.silu(sh.w1(x_TD)) * sh.w3(x_TD))
    # tokens 4.. overflowed expert 0: their output is exactly the shared expert's
    torch.testing.assert_close(y.reshape(T, D)[4:], shared_only[4:], rtol=0, atol=0)
