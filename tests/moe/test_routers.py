"""Routing methods from the literature (moetrain.moe.routing, moetrain.moe.router) against their
papers' formulas: hand-worked tensors, independent re-implementations written here, and
statistical checks with tolerances from the binomial standard deviation (fixed seeds).

  GShard top-2 random routing  Lepikhin et al. 2020, Algorithm 1
  Switch top-1 (+ jitter)      Fedus et al. 2021
  Noisy top-k                  Shazeer et al. 2017 (importance CV^2, smooth load estimator)
  Expert choice                Zhou et al. 2022
  Aux-loss-free bias           DeepSeek-V3
  Overflow reroute             moe.overflow=reroute
  Aux-loss scopes              micro_batch | sequence | global_batch (world 2, gloo)
  Fine-grained experts         DeepSeekMoE: same active FLOPs as the coarse layer

Shape legend: T tokens, E experts, K choices, D dim, B batch, S sequence.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _dist import run_dist
from moetrain.config import MoEConfig
from moetrain.moe import routing as R
from moetrain.moe.layer import MoELayer
from moetrain.moe.router import Router
from moetrain.moe.routing import load_balancing_loss

TOL = dict(rtol=1e-5, atol=1e-6)


def gate(kind, E, top_k, dim=None, cf=None, min_capacity=0, **kw):
    """A Router whose logits are exactly x @ W^T; W = identity when dim is None (logits = x).
    kw: moe.* keys (router_jitter, overflow, aux_loss_scope, aux_free_gamma, ...)."""
    dim = E if dim is None else dim
    g = Router(MoEConfig(num_experts=E, top_k=top_k, router=kind, capacity_factor=cf, min_capacity=min_capacity,
                         **kw), dim)
    with torch.no_grad():
        if dim == E:
            g.weight.copy_(torch.eye(E))
        else:
            g.weight.copy_(torch.randn(E, dim, generator=torch.Generator().manual_seed(0)))
        if g.noise_weight is not None:
            g.noise_weight.copy_(torch.randn(E, dim, generator=torch.Generator().manual_seed(1)) * 0.3)
    return g


def sel_of(idx, weights=None, active=None, E=None):
    idx = torch.tensor(idx)
    T, K = idx.shape
    E = E if E is not None else int(idx.max()) + 1
    w = torch.full((T, K), 1.0 / K) if weights is None else torch.tensor(weights, dtype=torch.float32)
    a = torch.ones(T, K, dtype=torch.bool) if active is None else torch.tensor(active)
    return R.Selection(idx, w, a, torch.full((T, E), 1.0 / E))


def phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


# ----------------------------------------------------------------------------------------------
# GShard
# ----------------------------------------------------------------------------------------------

def _renormalized_g2(logits):
    p = torch.softmax(logits.double(), -1)
    top = torch.topk(p, 2, dim=-1).values
    return top[:, 1] / top.sum(-1)


def test_gshard_second_expert_rate_is_expected_min_1_2g2():
    """P(second dispatched | x) = min(1, 2 g2): the empirical rate over 40k tokens equals
    E[min(1, 2 g2)] within 4 binomial standard deviations, overall and per g2 bin."""
    T, E = 20000, 8
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen) * 1.5
    u = torch.rand(T, generator=gen)
    sel = R.select_gshard(logits, u)
    g2 = _renormalized_g2(logits)
    p = torch.clamp(2 * g2, max=1.0)
    got = sel.active_TK[:, 1].double()
    assert sel.active_TK[:, 0].all()
    std = math.sqrt(float((p * (1 - p)).sum())) / T
    assert abs(float(got.mean()) - float(p.mean())) < 4 * std
    assert 0.2 < float(p.mean()) < 0.9              # the test exercises both outcomes
    for lo, hi in [(0.0, 0.15), (0.15, 0.3), (0.3, 0.5)]:
        m = (g2 >= lo) & (g2 < hi)
        n = int(m.sum())
        assert n > 500
        pb = p[m]
        std_b = math.sqrt(float((pb * (1 - pb)).sum())) / n
        assert abs(float(got[m].mean()) - float(pb.mean())) < 4 * std_b, (lo, hi)
    # the weights are g1, g2 renormalized by their sum, whether or not the second is dispatched
    torch.testing.assert_close(sel.weights_TK[:, 1].double(), g2, **TOL)
    torch.testing.assert_close(sel.weights_TK.sum(-1), torch.ones(T), **TOL)


def test_gshard_gate_in_training_draws_u_per_token():
    """The Router's own draws (torch default generator, seeded per rank by the trainer): same rate."""
    T, E = 20000, 8
    g = gate("gshard", E, 2).train()
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 1.5
    torch.manual_seed(11)
    out = g(x, None, 1)
    p = torch.clamp(2 * _renormalized_g2(x), max=1.0)
    got = out.routing.kept_TK[:, 1].double()          # dropless: kept == dispatched
    std = math.sqrt(float((p * (1 - p)).sum())) / T
    assert abs(float(got.mean()) - float(p.mean())) < 4 * std
    assert out.routing.kept_TK[:, 0].all()
    # reproducible from the seed
    torch.manual_seed(11)
    again = g(x, None, 1)
    assert torch.equal(again.routing.kept_TK, out.routing.kept_TK)
    # skipped second choices are not counted as routed copies
    assert int(out.routing.counts_E.sum()) == T + int(got.sum())


def test_gshard_random_routing_only_in_training():
    """Eval: u = 0, so the second expert is dispatched wherever 2 * g2 > 0, i.e. always."""
    T, E = 4000, 8
    g = gate("gshard", E, 2)
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(4)) * 3
    g.eval()
    a = g(x, None, 1).routing
    b = g(x, None, 1).routing
    assert a.kept_TK.all() and torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    g.train()
    torch.manual_seed(0)
    t = g(x, None, 1).routing
    assert not t.kept_TK[:, 1].all()
    assert torch.equal(t.expert_idx_TK, a.expert_idx_TK)   # same experts; only dispatch differs


def test_gshard_first_choices_fill_buffers_before_any_second_choice():
    """Hand example, E = 3, capacity 2. Choice-major priority: first choices of every token take
    their slots before any second choice; an undispatched second choice takes no slot.

        token  first second(active)   slots (first | second)
        t0     1     0 (no)           1:0 | -
        t1     0     1                0:0 | 1:2 -> dropped
        t2     2     1                2:0 | 1:3 -> dropped
        t3     1     0                1:1 | 0:1 -> kept
    Token-major order would instead drop t3's FIRST choice (expert 1 would hold t0, t1's second).
    """
    sel = sel_of([[1, 0], [0, 1], [2, 1], [1, 0]], active=[[True, False], [True, True], [True, True], [True, True]],
                 E=3)
    r = R.apply_capacity(sel, 3, 2)
    assert r.kept_TK.tolist() == [[True, False], [True, False], [True, False], [True, True]]
    assert r.counts_E.tolist() == [2, 4, 1]            # active copies only
    assert r.kept_E.tolist() == [2, 2, 1]
    # with t0's second dispatched it takes expert 0's second slot and t3's second is dropped
    sel2 = sel_of([[1, 0], [0, 1], [2, 1], [1, 0]], E=3)
    r2 = R.apply_capacity(sel2, 3, 2)
    assert r2.kept_TK.tolist() == [[True, True], [True, False], [True, False], [True, False]]


def test_gshard_aux_loss_by_hand():
    """l_aux = mean_e(c_e / S * m_e) * E^2 with c_e first-choice counts and m_e mean gates.

    probs rows [.7 .2 .1] [.1 .6 .3] [.5 .1 .4] [.3 .3 .4]  (S = 4, E = 3)
    first choices 0, 1, 0, 2 -> c = [2, 1, 1];  m = [1.6, 1.2, 1.2] / 4 = [.4, .3, .3]
    l_aux = mean([2/4 * .4, 1/4 * .3, 1/4 * .3]) * 9 = mean([.2, .075, .075]) * 9 = 1.05
    """
    probs = torch.tensor([[.7, .2, .1], [.1, .6, .3], [.5, .1, .4], [.3, .3, .4]])
    got = R.gshard_aux_loss(probs, torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(got, torch.tensor(1.05), **TOL)
    # through the Router (logits = log probs; softmax gives the probs back), train and eval
    g = gate("gshard", 3, 2)
    for mode in (g.train, g.eval):
        mode()
        out = g(probs.log(), None, 1)
        torch.testing.assert_close(out.aux_loss, torch.tensor(1.05), **TOL)
    # uniform routing gives exactly 1 (the E^2 normalization)
    u = R.gshard_aux_loss(torch.full((6, 3), 1 / 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    torch.testing.assert_close(u, torch.tensor(1.0), **TOL)


# ----------------------------------------------------------------------------------------------
# Switch
# ----------------------------------------------------------------------------------------------

SWITCH_PROBS = torch.tensor([[.7, .2, .1], [.1, .6, .3], [.5, .1, .4], [.3, .3, .4]])


def test_switch_aux_loss_by_hand():
    """E * sum_i f_i P_i: top-1 = [0, 1, 0, 2] -> f = [.5, .25, .25]; P = [.4, .3, .3];
    3 * (.2 + .075 + .075) = 1.05."""
    g = gate("switch", 3, 1).train()
    out = g(SWITCH_PROBS.log(), None, 1)
    assert out.routing.expert_idx_TK.squeeze(1).tolist() == [0, 1, 0, 2]
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.05), **TOL)
    torch.testing.assert_close(load_balancing_loss(SWITCH_PROBS, torch.tensor([[0], [1], [0], [2]])),
                               torch.tensor(1.05), **TOL)


def test_switch_top1_weight_is_the_raw_probability():
    g = gate("switch", 3, 1)
    out = g(SWITCH_PROBS.log(), None, 1)
    torch.testing.assert_close(out.routing.weights_TK.squeeze(1), torch.tensor([.7, .6, .5, .4]), **TOL)


def test_switch_jitter_changes_routing_only_in_training():
    """Jitter multiplies the router input by U(1 - eps, 1 + eps) in training; eval is exact."""
    T, E, D, eps = 2000, 4, 16, 0.5
    plain = gate("switch", E, 1, dim=D)
    jit = gate("switch", E, 1, dim=D, router_jitter=eps)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    ref = plain(x, None, 1)
    jit.eval()
    ev = jit(x, None, 1)
    assert torch.equal(ev.logits_TE, ref.logits_TE)
    assert torch.equal(ev.routing.expert_idx_TK, ref.routing.expert_idx_TK)
    jit.train()
    torch.manual_seed(7)
    tr = jit(x, None, 1)
    changed = (tr.routing.expert_idx_TK != ref.routing.expert_idx_TK).float().mean()
    assert 0.01 < float(changed) < 0.9
    # the logits are exactly those of the jittered input (same draw, reproduced)
    torch.manual_seed(7)
    m = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(tr.logits_TE, F.linear(x * m, jit.weight), **TOL)


# ----------------------------------------------------------------------------------------------
# Noisy top-k
# ----------------------------------------------------------------------------------------------

def _reference_load_loss(clean, noisy, std, k):
    """Shazeer et al. 2017, eq. 8-10, one (token, expert) at a time:
    P(x, e) = Phi((clean_e - kth_excluding(H, k, e)) / std_e), with kth_excluding the k-th
    largest noisy logit among the OTHER experts. Load_e = sum_x P(x, e); loss = CV(Load)^2."""
    T, E = clean.shape
    P = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for e in range(E):
            others = torch.cat([noisy[t, :e], noisy[t, e + 1:]]).double()
            kth = torch.sort(others, descending=True).values[k - 1]
            P[t, e] = phi((clean[t, e].double() - kth) / std[t, e].double())
    load = P.sum(0)
    return ((load - load.mean()) ** 2).mean() / load.mean() ** 2


def test_noisy_topk_h_is_clean_plus_normal_times_softplus():
    T, E, k = 16, 6, 2
    gen = torch.Generator().manual_seed(0)
    clean, raw, n = (torch.randn(T, E, generator=gen) for _ in range(3))
    std = F.softplus(raw)
    sel, H = R.select_noisy_topk(clean, std, n, k)
    torch.testing.assert_close(H, clean + n * std, **TOL)
    # keep the top k of H; weights = softmax over the kept k only; zeros elsewhere
    top_vals, top_idx = torch.topk(H, k, dim=-1)
    assert torch.equal(sel.expert_idx_TK, top_idx)
    torch.testing.assert_close(sel.weights_TK, torch.softmax(top_vals, -1), **TOL)
    dense = torch.zeros(T, E).scatter(1, top_idx, torch.softmax(top_vals, -1))
    torch.testing.assert_close(sel.probs_TE, dense, **TOL)
    # eval: no noise
    _, H_eval = R.select_noisy_topk(clean, std, None, k)
    torch.testing.assert_close(H_eval, clean)


def test_cv_squared_of_importance_by_hand():
    """Importance = column sums of the gates = [2, 1, 1, 0]: mean 1, population var .5 -> CV^2 .5."""
    gates = torch.tensor([[1., 0, 0, 0], [.5, .5, 0, 0], [.5, 0, .5, 0], [0, .5, .5, 0]])
    torch.testing.assert_close(R.cv_squared(gates.sum(0)), torch.tensor(0.5), **TOL)
    torch.testing.assert_close(R.cv_squared(torch.ones(5)), torch.tensor(0.0))
    H = torch.randn(4, 4)
    imp, _ = R.noisy_topk_losses(gates, H, H, torch.ones(4, 4), 2)
    torch.testing.assert_close(imp, torch.tensor(0.5), **TOL)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_load_loss_equals_independent_estimator(k):
    T, E = 40, 6
    gen = torch.Generator().manual_seed(10 + k)
    clean = torch.randn(T, E, generator=gen)
    std = F.softplus(torch.randn(T, E, generator=gen)) + 1e-2
    n = torch.randn(T, E, generator=gen)
    sel, H = R.select_noisy_topk(clean, std, n, k)
    _, load = R.noisy_topk_losses(sel.probs_TE, clean, H, std, k)
    torch.testing.assert_close(load.double(), _reference_load_loss(clean, H, std, k), rtol=1e-4, atol=1e-6)


def test_noisy_topk_gate_aux_is_importance_plus_load_with_its_own_noise():
    """Router in training: H = x W_g + n * (softplus(x W_noise) + 1e-2), n ~ N(0, 1) from the
    default generator; aux = CV(Importance)^2 + CV(Load)^2. In eval: no noise, no load term."""
    T, E, D, k = 48, 5, 7, 2
    g = gate("noisy_topk", E, k, dim=D).train()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(21)
    out = g(x, None, 1)
    torch.manual_seed(21)
    n = torch.randn(T, E)
    clean = x @ g.weight.detach().t()
    std = F.softplus(x @ g.noise_weight.detach().t()) + 1e-2
    H = clean + n * std
    top_vals, top_idx = torch.topk(H, k, -1)
    assert torch.equal(out.routing.expert_idx_TK, top_idx)
    torch.testing.assert_close(out.routing.weights_TK, torch.softmax(top_vals, -1), **TOL)
    gates = torch.zeros(T, E).scatter(1, top_idx, torch.softmax(top_vals, -1))
    imp = gates.sum(0)
    want = ((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2 + _reference_load_loss(clean, H, std, k)
    torch.testing.assert_close(out.aux_loss.double(), want.double(), rtol=1e-4, atol=1e-6)
    # the load loss trains the noise network
    out.aux_loss.backward()
    assert g.noise_weight.grad is not None and g.noise_weight.grad.abs().sum() > 0
    g.eval()
    ev = g(x, None, 1)
    assert torch.equal(ev.routing.expert_idx_TK, torch.topk(clean, k, -1).indices)


def test_noisy_topk_noise_scale():
    """Clean logits all favour expert 0 by a wide margin. Tiny noise: everything goes to 0.
    Huge noise: the choice is near uniform over the E experts (binomial tolerance)."""
    T, E, k = 20000, 8, 2
    gen = torch.Generator().manual_seed(6)
    clean = torch.zeros(T, E)
    clean[:, 0] = 5.0
    clean[:, 1] = 2.0
    n = torch.randn(T, E, generator=gen)
    quiet, _ = R.select_noisy_topk(clean, torch.full((T, E), 1e-3), n, k)
    assert (quiet.expert_idx_TK[:, 0] == 0).all() and (quiet.expert_idx_TK[:, 1] == 1).all()
    loud, _ = R.select_noisy_topk(clean, torch.full((T, E), 1e4), n, k)
    frac = torch.bincount(loud.expert_idx_TK.reshape(-1), minlength=E).double() / (T * k)
    p = 1 / E
    std = math.sqrt(p * (1 - p) / (T * k))
    assert (frac - p).abs().max() < 5 * std, frac


# ----------------------------------------------------------------------------------------------
# Expert choice
# ----------------------------------------------------------------------------------------------

EC_PROBS = torch.tensor([
    [0.70, 0.20, 0.10],   # t0
    [0.50, 0.30, 0.20],   # t1   chosen by no expert
    [0.10, 0.10, 0.80],   # t2
    [0.60, 0.25, 0.15],   # t3
    [0.20, 0.50, 0.30],   # t4
    [0.25, 0.35, 0.40],   # t5   chosen by two experts
])


def test_expert_choice_exact_token_sets():
    """C = 2: expert 0 takes {t0 (.70), t3 (.60)}, expert 1 {t4 (.50), t5 (.35)},
    expert 2 {t2 (.80), t5 (.40)}; t1 is taken by nobody."""
    r, _ = R.route_expert_choice(EC_PROBS.log(), 2)
    sets = [set(torch.nonzero(r.kept_TK[:, e]).squeeze(1).tolist()) for e in range(3)]
    assert sets == [{0, 3}, {4, 5}, {2, 5}]
    assert r.kept_E.tolist() == [2, 2, 2] and r.counts_E.tolist() == [2, 2, 2]
    assert not r.kept_TK[1].any()
    assert r.expert_idx_TK.tolist() == [[0, 1, 2]] * 6
    torch.testing.assert_close(r.weights_TK, EC_PROBS, **TOL)      # weight = S[t, e]


def test_expert_choice_ties_go_to_lower_token_index():
    r, _ = R.route_expert_choice(torch.zeros(5, 3), 2)
    for e in range(3):
        assert torch.nonzero(r.kept_TK[:, e]).squeeze(1).tolist() == [0, 1]


@pytest.mark.parametrize("T,E,cf,top_k", [(37, 5, 1.0, 1), (64, 8, 1.25, 2), (10, 4, 2.0, 2)])
def test_expert_choice_every_expert_takes_exactly_C(T, E, cf, top_k):
    g = gate("expert_choice", E, top_k, dim=6, cf=cf)
    x = torch.randn(T, 6, generator=torch.Generator().manual_seed(T))
    out = g(x, None, 1)
    C = min(T, math.ceil(cf * top_k * T / E - 1e-9))
    assert out.routing.capacity == C or C == T
    assert out.routing.kept_E.tolist() == [C] * E
    assert out.routing.kept_TK.sum(0).tolist() == [C] * E
    # and they are that expert's top-C tokens by S[:, e]
    probs = torch.softmax(out.logits_TE, -1)
    for e in range(E):
        chosen = probs[out.routing.kept_TK[:, e], e]
        rest = probs[~out.routing.kept_TK[:, e], e]
        if rest.numel():
            assert chosen.min() >= rest.max()


def test_expert_choice_layer_output_and_unchosen_tokens_get_zero():
    """MoELayer with router expert_choice: y_t = sum over experts e that took t of
    S[t, e] * FFN_e(x_t); a token taken by no expert gets exactly 0."""
    D, H, E, B, S = 6, 5, 3, 1, 6
    moe = MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0, min_capacity=0, router="expert_choice",
                    grouped_mm="loop")
    layer = MoELayer(moe, D, H).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    # make the router logits exactly log(EC_PROBS): x has a block that the router reads
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :3] = torch.eye(3)
        x[0, :, :3] = EC_PROBS.double().log()
    y, aux = layer(x)
    ex = layer.experts
    chosen = {0: [0, 3], 1: [4, 5], 2: [2, 5]}          # C = ceil(1.0 * 1 * 6 / 3) = 2
    want = torch.zeros(S, D, dtype=torch.float64)
    for e, toks in chosen.items():
        for t in toks:
            xt = x[0, t]
            want[t] += EC_PROBS[t, e].double() * ((F.silu(xt @ ex.w1[e]) * (xt @ ex.w3[e])) @ ex.w2[e])
    torch.testing.assert_close(y[0], want, **TOL)
    assert torch.count_nonzero(y[0, 1]) == 0
    assert aux.recv_tokens == 6 and aux.kept_E.tolist() == [2, 2, 2]


# ----------------------------------------------------------------------------------------------
# Aux-loss-free bias (DeepSeek-V3)
# ----------------------------------------------------------------------------------------------

def test_aux_free_bias_update_is_gamma_sign_mean_minus_load():
    b = torch.tensor([0.1, -0.2, 0.0, 0.3])
    load = torch.tensor([10., 2., 4., 4.])           # mean 5
    got = R.aux_free_bias_update(b, load, 0.01)
    torch.testing.assert_close(got, b + 0.01 * torch.tensor([-1., 1., 1., 1.]))
    load = torch.tensor([5., 5., 2., 8.])            # at the mean: no change
    torch.testing.assert_close(R.aux_free_bias_update(b, load, 0.01), b + 0.01 * torch.tensor([0., 0., 1., -1.]))
    # through the Router buffer (what Trainer.update_router_biases calls after the optimizer step)
    g = gate("aux_free", 4, 2, aux_free_gamma=0.5).train()
    g(torch.randn(8, 4), None, 1)                    # the forward pass never touches the bias
    assert torch.equal(g.expert_bias, torch.zeros(4))
    g.update_bias(torch.tensor([10., 2., 4., 4.]))
    torch.testing.assert_close(g.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))


def test_aux_free_bias_moves_a_skewed_toy_problem_toward_balance():
    """Fixed logits strongly favour expert 0 (and 1): max/mean load starts at 4 (every token's
    top 2 are experts 0 and 1). Bias updates from the observed load after every "step" bring it
    to near 1 (the sign update then hovers within one gamma step); the weights never include
    the bias."""
    T, E, k, gamma = 512, 8, 2, 0.005
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(T, E, generator=gen) * 0.5
    logits[:, 0] += 3.0
    logits[:, 1] += 1.5
    g = gate("aux_free", E, k, aux_free_gamma=gamma)
    s_TE = torch.sigmoid(logits)
    history = []
    for _ in range(120):
        out = g(logits, None, 1)
        load = out.routing.counts_E.float()
        history.append(float(load.max() / load.mean()))
        # weights: the chosen sigmoid scores WITHOUT the bias, normalized to sum 1
        s = s_TE.gather(1, out.routing.expert_idx_TK)
        torch.testing.assert_close(out.routing.weights_TK, s / s.sum(-1, keepdim=True), **TOL)
        g.update_bias(load)
    assert history[0] == 4.0
    assert max(history[-20:]) < 1.2, history[-20:]
    assert history[40] < history[0]
    assert g.expert_bias[0] < g.expert_bias[1] < g.expert_bias[2:].min()


def test_aux_free_bias_steers_choice_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    sel = R.select_biased(logits, bias, 2)
    assert sel.expert_idx_TK.tolist() == [[3, 0]]      # the bias made expert 3 win
    s = torch.sigmoid(torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(sel.weights_TK, (s / s.sum())[None], **TOL)


# ----------------------------------------------------------------------------------------------
# Overflow reroute
# ----------------------------------------------------------------------------------------------

def test_reroute_hand_example_moves_to_next_best_with_room():
    """F = 4, K = 1, capacity 1; every token's first choice is expert 0.
    t0 keeps 0. t1 (pref 0,1,2,3) -> 1. t2 (pref 0,1,3,2): 1 is full (t1 came first) -> 3.
    t3 (pref 0,1,2,3): 1 full -> 2 has room -> 2. The gate weight travels with the copy."""
    sel = sel_of([[0], [0], [0], [0]], weights=[[.9], [.8], [.7], [.6]], E=4)
    pref = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3, 2], [0, 1, 2, 3]])
    r = R.apply_capacity(sel, 4, 1, pref)
    assert r.expert_idx_TK.squeeze(1).tolist() == [0, 1, 3, 2]
    assert r.kept_TK.all()
    assert r.kept_E.tolist() == [1, 1, 1, 1]
    assert r.counts_E.tolist() == [4, 0, 0, 0]        # routed counts are the original choices
    torch.testing.assert_close(r.weights_TK, torch.tensor([[.9], [.8], [.7], [.6]]))
    # residual policy for comparison: only t0 kept
    res = R.apply_capacity(sel, 4, 1)
    assert res.kept_TK.squeeze(1).tolist() == [True, False, False, False]


def test_reroute_never_to_an_expert_the_token_already_uses():
    """K = 2, capacity 1. t0 = (0, 1) fills both. t1 = (0, 2): its first copy overflows;
    pref (0, 2, 1, 3): 2 is its own second choice, 1 is full -> 3."""
    sel = sel_of([[0, 1], [0, 2]], E=4)
    pref = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3]])
    r = R.apply_capacity(sel, 4, 1, pref)
    assert r.expert_idx_TK.tolist() == [[0, 1], [3, 2]]
    assert r.kept_TK.all()


def test_reroute_continues_while_some_copy_can_still_move():
    """K = 2, F = 4, capacity 1. t0 = (0, 1) fills both. t1 = (0, 1): both copies overflow,
    pref (0, 1, 2, 3); experts 2 and 3 are empty -> t1's copies go to 2 and 3."""
    sel = sel_of([[0, 1], [0, 1]], E=4)
    pref = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    r = R.apply_capacity(sel, 4, 1, pref)
    assert sorted(r.expert_idx_TK[1].tolist()) == [2, 3]
    assert r.kept_TK.all()


def _check_reroute_invariants(sel, F_, cap, pref):
    res = R.apply_capacity(sel, F_, cap)
    rr = R.apply_capacity(sel, F_, cap, pref)
    idx, kept = rr.expert_idx_TK, rr.kept_TK
    # never over capacity, and kept_E counts what is kept
    assert int(rr.kept_E[:F_].max()) <= cap
    assert rr.kept_E.tolist() == torch.bincount(idx[kept], minlength=sel.probs_TE.shape[1]).tolist()
    # copies kept under the residual policy stay where they were
    assert torch.equal(idx[res.kept_TK], sel.expert_idx_TK[res.kept_TK]) and kept[res.kept_TK].all()
    # no token holds two kept copies on one expert (nor moves onto one of its original choices)
    for t in range(idx.shape[0]):
        ids = idx[t][kept[t]].tolist()
        assert len(ids) == len(set(ids))
        moved = (idx[t] != sel.expert_idx_TK[t]) & kept[t]
        assert not set(idx[t][moved].tolist()) & set(sel.expert_idx_TK[t].tolist())
    # a moved copy went to an expert that ranks below its original in the token's preference
    rank = torch.argsort(pref, dim=-1)
    moved = kept & (idx != sel.expert_idx_TK)
    assert (rank.gather(1, idx)[moved] > rank.gather(1, sel.expert_idx_TK)[moved]).all()
    # weights unchanged; never fewer copies kept than with the residual policy
    assert torch.equal(rr.weights_TK, sel.weights_TK)
    assert int(kept.sum()) >= int(res.kept_TK.sum())
    return int(kept.sum()) - int(res.kept_TK.sum())


def test_reroute_invariants_on_random_skewed_routing():
    gained = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        T, F_, K = 40, 6, 2
        logits = torch.randn(T, F_, generator=gen)
        logits[:, seed % F_] += 2.0                 # a hot expert so copies overflow
        sel = R.select_topk(logits, K, True)
        pref = torch.argsort(sel.probs_TE, dim=-1, descending=True, stable=True)
        gained += _check_reroute_invariants(sel, F_, 10, pref)
    assert gained > 0


def test_gate_reroute_uses_router_preference():
    """Router(overflow reroute) == apply_capacity with each token's experts sorted by probability."""
    T, E, D = 64, 8, 12
    g = gate("topk", E, 2, dim=D, cf=0.75, min_capacity=0, overflow="reroute")
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(9))
    out = g(x, None, 1)
    sel = R.select_topk(out.logits_TE, 2, True)
    pref = torch.argsort(sel.probs_TE, dim=-1, descending=True, stable=True)
    want = R.apply_capacity(sel, E, g.capacity(T), pref)
    assert torch.equal(out.routing.expert_idx_TK, want.expert_idx_TK)
    assert torch.equal(out.routing.kept_TK, want.kept_TK)
    res = R.apply_capacity(sel, E, g.capacity(T))
    assert int(out.routing.kept_TK.sum()) > int(res.kept_TK.sum())


def test_noisy_topk_reroute_goes_to_next_best_by_router_score():
    """Eval (no noise), top-1, capacity 1: both tokens pick expert 0; logits rank 3 second, so
    the overflowed copy of t1 should go to expert 3, not to expert 1."""
    g = gate("noisy_topk", 4, 1, dim=4, cf=0.5, min_capacity=1, overflow="reroute").eval()
    x = torch.tensor([[5.0, -3.0, -2.0, 1.0], [5.0, -3.0, -2.0, 1.0]])
    out = g(x, None, 1)
    assert out.routing.expert_idx_TK.squeeze(1).tolist() == [0, 3]


# ----------------------------------------------------------------------------------------------
# Aux-loss scopes
# ----------------------------------------------------------------------------------------------

def _switch_loss_by_hand(probs_TE, idx_TK):
    T, E = probs_TE.shape
    K = idx_TK.shape[1]
    total = 0.0
    for e in range(E):
        f = sum(int(i == e) for i in idx_TK.reshape(-1).tolist()) / (T * K)
        P = sum(float(probs_TE[t, e].detach()) for t in range(T)) / T
        total += f * P
    return E * total


def test_sequence_scope_is_the_mean_of_per_sequence_switch_losses():
    B, S, E, D, K = 3, 5, 4, 6, 2
    g = gate("topk", E, K, dim=D, aux_loss_scope="sequence")
    x = torch.randn(B * S, D, generator=torch.Generator().manual_seed(12))
    out = g(x, None, B)
    probs = torch.softmax(out.logits_TE.double(), -1)
    idx = out.routing.expert_idx_TK
    per_seq = [_switch_loss_by_hand(probs[b * S:(b + 1) * S], idx[b * S:(b + 1) * S]) for b in range(B)]
    want = sum(per_seq) / B
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    micro = gate("topk", E, K, dim=D)(x, None, B).aux_loss
    assert abs(float(micro) - want) > 1e-3           # the example tells the scopes apart


def _global_scope_layer(E, D, K):
    moe = MoEConfig(num_experts=E, top_k=K, capacity_factor=None, aux_loss_scope="global_batch", grouped_mm="loop")
    layer = MoELayer(moe, D, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.router.weight.copy_(gate("topk", E, K, dim=D).weight)
    return layer


def _global_scope_body(rank, world):
    from moetrain.parallel.apply import apply_routing_groups
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    par = init_parallel(world, 1, 1, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    E, D, K, B, S = 4, 6, 2, 2, 5
    T = B * S
    xs = [torch.randn(T, D, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    layer = _global_scope_layer(E, D, K)
    apply_routing_groups(layer, par)                 # the count sum over dp: the layer's door
    _, aux = layer(xs[rank].view(B, S, D))
    aux.aux_loss.backward()
    # reference, every rank's counts computed here from every rank's inputs
    ref = gate("topk", E, K, dim=D)
    counts = torch.zeros(E, dtype=torch.float64)
    for r in range(world):
        counts += torch.bincount(ref(xs[r], None, B).routing.expert_idx_TK.reshape(-1), minlength=E).double()
    probs = torch.softmax(xs[rank].double() @ ref.weight.detach().double().t(), -1)
    want = E * (counts / (T * K * world) * probs.mean(0)).sum()
    local = float(ref(xs[rank], None, B).aux_loss)
    # the gradient is that of the local P with the global f (counts carry no gradient)
    w = ref.weight.detach().clone().requires_grad_(True)
    (E * (counts.float() / (T * K * world) * torch.softmax(xs[rank] @ w.t(), -1).mean(0)).sum()).backward()
    return float(aux.aux_loss), float(want), local, layer.router.weight.grad, w.grad


def test_global_batch_scope_without_a_group_is_the_micro_batch_loss():
    """World 1 (no count sum installed): the counts are this micro batch's, bit for bit."""
    E, D, K, B, S = 4, 6, 2, 2, 5
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(7))
    out = gate("topk", E, K, dim=D, aux_loss_scope="global_batch")(x.view(B * S, D), None, B)
    assert out.aux_loss is None                      # the router leaves the count sum to its caller
    _, aux = _global_scope_layer(E, D, K)(x)
    micro = gate("topk", E, K, dim=D)(x.view(B * S, D), None, B).aux_loss
    assert torch.equal(aux.aux_loss, micro)


@pytest.mark.slow
def test_global_batch_scope_uses_every_dp_ranks_counts():
    outs = run_dist(_global_scope_body, 2)
    for got, want, local, grad, want_grad in outs:
        assert abs(got - want) < 1e-5
        torch.testing.assert_close(grad, want_grad, **TOL)
    assert any(abs(o[0] - o[2]) > 1e-4 for o in outs)    # differs from the micro-batch loss


# ----------------------------------------------------------------------------------------------
# Fine-grained experts (DeepSeekMoE)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [2, 4])
def test_fine_grained_experts_keep_active_flops_and_expert_params(m):
    """Granularity m: E*m experts of hidden H/m, top k*m. Per token the experts do
    k*m x 3*D*(H/m) multiply-adds = k x 3*D*H (coarse). Measured with FlopCounterMode, the
    layers differ only in the router matmul (E*m vs E outputs); parameter counts likewise."""
    from torch.utils.flop_counter import FlopCounterMode

    from moetrain.config import load_config
    from moetrain.model.transformer import Transformer, count_params

    base = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "model.ffn_hidden=64",
            "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=null", "train.seq_len=16"]
    coarse = load_config(None, base)
    fine = load_config(None, base + [f"moe.expert_granularity={m}"])
    D, E, k = 32, 4, 2
    H = coarse.expert_hidden
    assert fine.expert_hidden == H // m and fine.routed_top_k == k * m and fine.num_ffn_experts == E * m
    assert fine.routed_top_k * 3 * D * fine.expert_hidden == k * 3 * D * H

    def flops(cfg):
        model = Transformer(cfg)
        model.init_weights(0)
        layer = model.layers[0].ffn
        x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as fc:
            layer(x)
        return fc.get_total_flops(), model

    f_coarse, m_coarse = flops(coarse)
    f_fine, m_fine = flops(fine)
    T = 32
    assert f_coarse - 2 * T * D * E == 2 * T * k * 3 * D * H       # 2 flops per multiply-add
    assert f_fine - f_coarse == 2 * T * D * (E * m - E)
    tot_c, act_c = count_params(m_coarse, coarse)
    tot_f, act_f = count_params(m_fine, fine)
    router_extra = 2 * (E * m - E) * D                              # 2 MoE layers
    assert tot_f - tot_c == router_extra and act_f - act_c == router_extra
