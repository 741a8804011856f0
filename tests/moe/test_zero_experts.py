"""MoE++ (Jin et al. 2024) zero-computation experts and gated residuals in MoELayer.

Expert ids: 0..F-1 FFN experts, then zero experts (output 0), copy experts (output x) and
constant experts (a1 * x + a2 * v_j with [a1, a2] = softmax(W_j x)). They live on every rank,
never enter the all-to-all and take no FFN capacity. Gated residual: a layer's routing logits
add R @ (previous MoE layer's logits).

The reference below is a per-token Python loop sharing no code with moetrain.moe.
Shape legend: B batch, S sequence, T tokens, D dim, F FFN experts, E = all experts, K choices.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _dist import run_dist
from _oracle import reference_step
from moetrain.config import MoEConfig, ZeroExpertsConfig
from moetrain.moe.layer import MoELayer

D, H, FFN = 8, 6, 4
ZERO = (1, 1, 2)                   # zero, copy, constant
E_ALL = FFN + sum(ZERO)
B, S = 2, 8
T = B * S
TOL = dict(rtol=1e-5, atol=1e-6)


def make_layer(top_k=2, cf=None, zero=ZERO, seed=0, router_scale=1.5, gated_residual=False):
    moe = MoEConfig(num_experts=FFN, top_k=top_k, capacity_factor=cf, min_capacity=0,
                    zero_experts=ZeroExpertsConfig(*zero), grouped_mm="loop", gated_residual=gated_residual)
    layer = MoELayer(moe, D, H)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layer.router.weight.mul_(router_scale)
    return layer.double()


def make_input(seed=1, batch=B):
    return torch.randn(batch, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference(layer: MoELayer, x_BSD, top_k, cf, prev_logits=None):
    """Per-token loop: softmax over all E experts, top-k (ties: lowest id), renormalized;
    GShard capacity (choice-major) over FFN copies only; zero/copy/constant outputs by formula."""
    Z, Cp, Cn = layer.num_zero, layer.num_copy, layer.num_const
    E = FFN + Z + Cp + Cn
    x_TD = x_BSD.reshape(-1, D)
    n = x_TD.shape[0]
    W = layer.router.weight
    cap = None if cf is None else max(0, math.ceil(cf * top_k * n / FFN - 1e-9))
    choices, weights = [], []
    for t in range(n):
        lg = torch.stack([W[e] @ x_TD[t] for e in range(E)])
        if prev_logits is not None:
            R = layer.router.residual_weight
            lg = lg + torch.stack([R[e] @ prev_logits[t] for e in range(E)])
        p = torch.softmax(lg, -1)
        order = sorted(range(E), key=lambda e: (-float(p[e].detach()), e))[:top_k]
        tot = sum(p[e] for e in order)
        choices.append(order)
        weights.append([p[e] / tot for e in order] if top_k > 1 else [p[order[0]]])
    fill = [0] * FFN
    kept = {}
    for j in range(top_k):
        for t in range(n):
            e = choices[t][j]
            if e >= FFN:
                kept[t, j] = True                 # zero-computation: no capacity
            else:
                kept[t, j] = cap is None or fill[e] < cap
                fill[e] += 1
    rows, kinds = [], []
    for t in range(n):
        x = x_TD[t]
        y = x.new_zeros(D)
        for j in range(top_k):
            if not kept[t, j]:
                continue
            e, w = choices[t][j], weights[t][j]
            if e < FFN:
                out, kind = swiglu(x, layer.experts.w1[e], layer.experts.w3[e], layer.experts.w2[e]), "ffn"
            elif e < FFN + Z:
                out, kind = x.new_zeros(D), "zero"
            elif e < FFN + Z + Cp:
                out, kind = x, "copy"
            else:
                c = e - FFN - Z - Cp
                a = torch.softmax(layer.const_w[c] @ x, -1)
                out, kind = a[0] * x + a[1] * layer.const_v[c], "const"
            y = y + w * out
            kinds.append(kind)
        rows.append(y)
    return torch.stack(rows).view_as(x_BSD), kept, choices, kinds


def params_of(layer):
    return [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2, layer.const_w, layer.const_v]


@pytest.mark.parametrize("top_k,cf", [(2, None), (2, 0.5), (1, None), (3, 0.25)])
def test_layer_matches_per_token_reference_with_zero_copy_constant(top_k, cf):
    layer = make_layer(top_k, cf)
    x = make_input().requires_grad_(True)
    y, aux = layer(x)
    y_ref, kept, choices, kinds = reference(layer, x, top_k, cf)
    assert {"zero", "copy", "const", "ffn"} <= set(kinds), "test setup: every expert kind must be used"
    torch.testing.assert_close(y, y_ref, **TOL)
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ps = [x] + params_of(layer)
    got = torch.autograd.grad((y * G).sum(), ps)
    want = torch.autograd.grad((y_ref * G).sum(), ps)
    for name, a, b in zip(["x", "router", "w1", "w3", "w2", "const_w", "const_v"], got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    # statistics: counts over all E, FFN rows only reach the experts
    flat = [(choices[t][j], kept[t, j]) for t in range(T) for j in range(top_k)]
    assert aux.counts_E.tolist() == [sum(e == i for e, _ in flat) for i in range(E_ALL)]
    assert aux.kept_E.tolist() == [sum(e == i and k for e, k in flat) for i in range(E_ALL)]
    assert aux.recv_tokens == sum(k for e, k in flat if e < FFN)
    if cf is not None:
        assert any(not k for e, k in flat), "test setup: capacity should drop some FFN copies"


def test_zero_computation_copies_take_no_ffn_capacity():
    """Every token: first choice the copy expert (id F + 1), second FFN expert 0. Capacity
    C = ceil(1.0 * 2 * 16 / 4) = 8 applies to FFN experts only: all 16 copy-expert copies are
    kept, expert 0 keeps the first 8 second choices, and only those 8 rows reach the experts."""
    layer = make_layer(2, 1.0)
    copy_id = FFN + 1
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[copy_id, 0] = 50.0
        layer.router.weight[0, 0] = 25.0
    x = make_input()
    x[..., 0] = 1.0
    y, aux = layer(x)
    assert aux.counts_E.tolist() == [T, 0, 0, 0, 0, T, 0, 0]
    assert aux.kept_E.tolist() == [8, 0, 0, 0, 0, T, 0, 0]
    assert aux.recv_tokens == 8
    y_ref, kept, _, _ = reference(layer, x, 2, 1.0)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert [kept[t, 1] for t in range(T)] == [True] * 8 + [False] * 8


def test_zero_experts_only_means_no_expert_work():
    """All copies on zero-computation experts: the FFN experts receive no rows (and no grads)."""
    layer = make_layer(2, 0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[FFN + 2, 0] = 50.0      # constant expert 0
        layer.router.weight[FFN + 1, 0] = 25.0      # copy expert
    x = make_input()
    x[..., 0] = 1.0
    x.requires_grad_(True)
    y, aux = layer(x)
    assert aux.recv_tokens == 0 and aux.kept_E[:FFN].sum() == 0
    y.sum().backward()
    assert torch.count_nonzero(layer.experts.w1.grad) == 0
    y_ref, *_ = reference(layer, x, 2, 0.5)
    torch.testing.assert_close(y, y_ref, **TOL)


# ----------------------------------------------------------------------------------------------
# Expert parallel: zero-computation copies never enter the all-to-all
# ----------------------------------------------------------------------------------------------

def _ep_body(rank, world, cases):
    from moetrain.parallel.apply import apply_ep
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    par = init_parallel(world, 1, world, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    report = []
    for top_k, cf in cases:
        layer = make_layer(top_k, cf)
        xs = [make_input(seed=10 + r, batch=1) for r in range(world)]
        gys = [make_input(seed=20 + r, batch=1) for r in range(world)]
        refs = [reference_step(layer, xs[r], gys[r]) for r in range(world)]
        apply_ep(layer, par)
        x = xs[rank].clone().requires_grad_(True)
        y, aux = layer(x)
        (y * gys[rank]).sum().backward()
        y_ref, gx_ref, g_ref, a_ref = refs[rank]
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, gx_ref, rtol=1e-10, atol=1e-12)
        L = FFN // world
        for name, p in layer.named_parameters():
            want = (sum(refs[r][2][name] for r in range(world))[rank * L:(rank + 1) * L]
                    if name.startswith("experts.") else g_ref[name])
            torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)
        sent_rows = aux.timer.totals()["dispatch"][1] // (x.element_size() * D)
        ffn_kept = int(a_ref.kept_E[:FFN].sum())
        zero_kept = int(a_ref.kept_E[FFN:].sum())
        report.append(dict(sent=sent_rows, recv=aux.recv_tokens, ffn_kept=ffn_kept, zero_kept=zero_kept,
                           kept_E=aux.kept_E.tolist(), kept_E_ref=a_ref.kept_E.tolist()))
    return report


def test_ep2_zero_experts_never_enter_all_to_all_and_match_single_process():
    cases = [(2, None), (2, 0.5)]
    reports = run_dist(_ep_body, 2, (cases,))
    for c in range(len(cases)):
        per_rank = [rep[c] for rep in reports]
        for r in per_rank:
            assert r["kept_E"] == r["kept_E_ref"]
            assert r["sent"] == r["ffn_kept"]             # dispatch rows = FFN copies only
            assert r["zero_kept"] > 0                     # ... although zero-compute copies exist
        assert sum(r["recv"] for r in per_rank) == sum(r["ffn_kept"] for r in per_rank)


# ----------------------------------------------------------------------------------------------
# Gated residual
# ----------------------------------------------------------------------------------------------

def test_gated_residual_adds_a_projection_of_the_previous_logits():
    """logits_2 = W_2 h + R_2 logits_1, and the gradient of logits_2 reaches layer 1's router
    only through R_2: d sum(logits_2) / d W_1 = (R_2^T 1) (sum_t x_t)^T."""
    first = make_layer(2, None, seed=0, gated_residual=True)
    second = make_layer(2, None, seed=1, gated_residual=True)
    x = make_input(seed=2)
    h = make_input(seed=3)                     # independent of layer 1: only the residual links them
    _, aux1 = first(x)
    assert first.router.residual_weight is not None
    _, aux2 = second(h, aux1.logits)
    x_TD, h_TD = x.reshape(T, D), h.reshape(T, D)
    W1, W2, R2 = first.router.weight, second.router.weight, second.router.residual_weight
    torch.testing.assert_close(aux1.logits, x_TD @ W1.t(), **TOL)        # first layer: no previous
    torch.testing.assert_close(aux2.logits, h_TD @ W2.t() + (x_TD @ W1.t()) @ R2.t(), **TOL)
    aux2.logits.sum().backward()
    want = R2.detach().sum(0)[:, None] * x_TD.sum(0)[None, :]
    torch.testing.assert_close(W1.grad, want, **TOL)
    # and the output of layer 2 equals the reference computed with the residual logits
    y2, _ = second(h, aux1.logits.detach())
    y_ref, *_ = reference(second, h, 2, None, prev_logits=aux1.logits.detach())
    torch.testing.assert_close(y2, y_ref, **TOL)


def test_gated_residual_in_the_model_trains_the_first_router_through_the_second():
    """In the Transformer the second MoE layer's routing depends on the first's logits: with
    every other path to layer 1's router cut (only layer 2's aux loss), the gradient is non-zero,
    and it is exactly zero when R_2 = 0."""
    from moetrain.config import load_config
    from moetrain.model.transformer import Transformer
    cfg = load_config(None, ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=8",
                             "model.ffn_hidden=16", "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=null",
                             "moe.gated_residual=true", "moe.zero_experts.zero=1", "train.seq_len=8"])
    model = Transformer(cfg)
    model.init_weights(0)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    r0, r1 = model.layers[0].ffn.router, model.layers[1].ffn.router
    # cut the other path: with w2 = 0 the first MoE layer outputs 0 (its FFN experts output 0,
    # its zero expert outputs 0) whatever its router does
    with torch.no_grad():
        model.layers[0].ffn.experts.w2.zero_()
    _, auxes = model(tokens)
    auxes[1].logits.sum().backward()
    assert r0.weight.grad is not None and r0.weight.grad.abs().sum() > 0
    assert r0.residual_weight.grad is None             # the first MoE layer has no previous logits
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        r1.residual_weight.zero_()
    _, auxes = model(tokens)
    auxes[1].logits.sum().backward()
    g = r0.weight.grad
    assert g is None or torch.count_nonzero(g) == 0
