"""PEER (He 2024): product-key retrieval equals brute force over all n^2 keys; the layer equals a
naive loop over heads and retrieved experts (BatchNorm'd queries included); the EP-sharded
layer (expert tables row-sliced over 2 gloo ranks) equals the unsharded one in outputs and grads.

Shape legend: T tokens, D dim, Hh heads, K retrieved experts per head, n sub-keys, N = n^2.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _dist import run_dist
from moetrain.moe.peer import PEERLayer, brute_force_topk, product_key_topk

TOL = dict(rtol=1e-9, atol=1e-11)


def full_key_topk(q1, q2, k1, k2, k):
    """Independent brute force: build every full key [k1_i ; k2_j] (id i*n + j) and score q . key."""
    Hh, d = q1.shape[1:]
    n = k1.shape[1]
    keys = torch.cat([k1[:, :, None, :].expand(Hh, n, n, d), k2[:, None, :, :].expand(Hh, n, n, d)], -1)
    keys = keys.reshape(Hh, n * n, 2 * d)                      # row i*n + j
    scores = torch.einsum("thd,hnd->thn", torch.cat([q1, q2], -1), keys)
    return torch.topk(scores, k, dim=-1)


@pytest.mark.parametrize("n,k,heads,d", [(8, 4, 1, 4), (16, 8, 4, 6), (5, 5, 2, 3), (32, 1, 3, 8), (12, 7, 2, 5)])
def test_product_key_topk_equals_brute_force(n, k, heads, d):
    gen = torch.Generator().manual_seed(n * 100 + k)
    T = 20
    q1, q2 = (torch.randn(T, heads, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k1, k2 = (torch.randn(heads, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    vals, ids = product_key_topk(q1, q2, k1, k2, k)
    ref_vals, ref_ids = full_key_topk(q1, q2, k1, k2, k)
    torch.testing.assert_close(vals, ref_vals, **TOL)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    lib_vals, lib_ids = brute_force_topk(q1, q2, k1, k2, k)
    torch.testing.assert_close(lib_vals, ref_vals, **TOL)
    assert torch.equal(lib_ids.sort(-1).values, ref_ids.sort(-1).values)
    # and every returned score is the score of the returned id
    i, j = ids // n, ids % n
    s1 = torch.einsum("thd,hnd->thn", q1, k1).gather(-1, i)
    s2 = torch.einsum("thd,hnd->thn", q2, k2).gather(-1, j)
    torch.testing.assert_close(vals, s1 + s2, **TOL)


D, N_KEYS, HEADS, TOPK, KEY_DIM = 8, 6, 2, 3, 8


def make_peer(query_bn=True, seed=0, num_keys=N_KEYS):
    layer = PEERLayer(D, num_keys, HEADS, TOPK, KEY_DIM, query_bn=query_bn).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.5 if "bn" not in name else 0.2)
                    + (1.0 if name == "query_bn.weight" else 0.0))
    return layer


def naive_peer(layer: PEERLayer, x_BSD):
    """Per token, per head: q = BN(W_q x) (training-mode batch statistics, biased variance), all
    n^2 full-key scores, top-k, softmax, sum_k w * gelu(u_id . x) v_id; heads summed."""
    x_TD = x_BSD.reshape(-1, D)
    T = x_TD.shape[0]
    q = x_TD @ layer.query.weight.t()
    if layer.query_bn is not None:
        bn = layer.query_bn
        mean = q.mean(0)
        var = ((q - mean) ** 2).mean(0)
        q = (q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    n, half = layer.num_keys, KEY_DIM // 2
    out = []
    for t in range(T):
        y = x_TD.new_zeros(D)
        for h in range(layer.heads):
            qh = q[t, h * KEY_DIM:(h + 1) * KEY_DIM]
            scores = torch.stack([qh[:half] @ layer.keys1[h, i] + qh[half:] @ layer.keys2[h, j]
                                  for i in range(n) for j in range(n)])
            top, ids = torch.topk(scores, layer.top_k)
            w = torch.softmax(top, -1)
            for wk, e in zip(w, ids.tolist()):
                y = y + wk * F.gelu(layer.expert_down[e] @ x_TD[t]) * layer.expert_up[e]
        out.append(y)
    return torch.stack(out).view_as(x_BSD)


@pytest.mark.parametrize("dense_scoring", [False, True], ids=["gather_rows", "score_all_rows"])
@pytest.mark.parametrize("query_bn", [True, False])
def test_peer_layer_equals_naive_loop(query_bn, dense_scoring):
    layer = make_peer(query_bn).train()
    layer.dense_scoring = dense_scoring
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref = naive_peer(layer, x)
    # the layer takes the softmax over the k scores in fp32 (routing math), hence 1e-5
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-7)
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ps = [x] + [p for p in layer.parameters()]
    got = torch.autograd.grad((y * G).sum(), ps)
    want = torch.autograd.grad((y_ref * G).sum(), ps, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


def _ep_body(rank, world):
    from moetrain.parallel.apply import apply_ep
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    par = init_parallel(world, 1, world, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    out = []
    for query_bn, dense_scoring in ((True, False), (False, False), (True, True)):
        layer = make_peer(query_bn).train()
        layer.dense_scoring = dense_scoring
        xs = [torch.randn(2, 5, D, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64)
              for r in range(world)]
        gys = [torch.randn(2, 5, D, generator=torch.Generator().manual_seed(20 + r), dtype=torch.float64)
               for r in range(world)]
        refs = []
        for r in range(world):
            ref = copy.deepcopy(layer)
            xr = xs[r].clone().requires_grad_(True)
            yr = ref(xr)
            (yr * gys[r]).sum().backward()
            refs.append((yr.detach(), xr.grad, {n: p.grad.clone() for n, p in ref.named_parameters()},
                         {n: b.clone() for n, b in ref.named_buffers()}))
        apply_ep(layer, par)
        rows = layer.num_experts // world
        assert layer.expert_down.shape[0] == rows and layer.row_offset == rank * rows
        x = xs[rank].clone().requires_grad_(True)
        y = layer(x)
        (y * gys[rank]).sum().backward()
        y_ref, gx_ref, g_ref, buf_ref = refs[rank]
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, gx_ref, rtol=1e-10, atol=1e-12)
        for name, p in layer.named_parameters():
            if name.startswith("expert_"):
                # the table rows held here saw every rank's tokens (all-gathered)
                want = sum(refs[r][2][name] for r in range(world))[rank * rows:(rank + 1) * rows]
            else:
                want = g_ref[name]
            torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)
        for name, b in layer.named_buffers():
            torch.testing.assert_close(b, buf_ref[name], msg=name)
        out.append(True)
    return out


def test_ep_sharded_peer_equals_unsharded():
    assert run_dist(_ep_body, 2) == [[True, True, True]] * 2


# ----------------------------------------------------------------------------------------------
# Parameter counts (moetrain.model.transformer.count_params) for PEER models
# ----------------------------------------------------------------------------------------------

def _peer_model():
    from moetrain.config import load_config
    from moetrain.model.transformer import Transformer
    cfg = load_config(None, ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=8",
                             "model.ffn_hidden=32", "moe.layer=peer", "moe.peer.num_keys=8", "moe.peer.heads=2",
                             "moe.peer.top_k=4", "moe.peer.key_dim=8", "train.seq_len=8"])
    return cfg, Transformer(cfg)


def test_count_params_total_of_an_ep_sharded_peer_model_is_global():
    from moetrain.model.transformer import count_params
    cfg, model = _peer_model()
    total, _ = count_params(model, cfg)
    for b in model.layers:
        b.ffn.shard_(32, 32)                 # what apply_ep does on rank 1 of ep = 2
    assert count_params(model, cfg)[0] == total


def test_count_params_active_of_a_peer_model_counts_retrieved_experts_only():
    from moetrain.model.transformer import count_params
    cfg, model = _peer_model()
    total, active = count_params(model, cfg)
    assert total == sum(p.numel() for p in model.parameters())
    N, Dm, per_token = 64, 16, 2 * 4                  # N experts of 2*D params; heads * top_k per token
    layers = len(model.layers)
    assert total - active == layers * (N - per_token) * 2 * Dm
