"""Expert-parallel MoE layer == the same layer with every expert in one process.

Oracle: each rank's batch run through the unsharded layer locally. Capacity is per source rank's
batch (GShard), so outputs must match exactly that; expert weight gradients must equal the sum of
the reference gradients over the ranks of the EP group (before edp sync).
"""

import pytest
import torch

from _dist import run_dist
from _oracle import reference_step
from moetrain.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.parallel.apply import apply_ep
from moetrain.parallel.mesh import LaunchEnv, init_parallel

E, D, H, T = 8, 12, 16, 10


def _make_layer(k, cf, shared, seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1, shared_experts=shared,
                    grouped_mm="loop")
    layer = MoELayer(moe, D, H).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _inputs(world, hot_expert=None):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, T, D, generator=g, dtype=torch.float64) for _ in range(world)]
    gys = [torch.randn(1, T, D, generator=g, dtype=torch.float64) for _ in range(world)]
    return xs, gys


def _force_hot(layer, hot):
    """Every token's first choice = `hot` (a big logit on a feature made constant below)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[hot, 0] = 5.0


def _body(par, rank, world, ep, k, cf, shared, hot):
    layer = _make_layer(k, cf, shared)
    xs, gys = _inputs(world)
    if hot is not None:
        _force_hot(layer, hot)
        for x in xs:
            x[..., 0] = 10.0
    refs = [reference_step(layer, xs[r], gys[r]) for r in range(world)]
    apply_ep(layer, par)
    x = xs[rank].clone().requires_grad_(True)
    y, aux = layer(x)
    (y * gys[rank]).sum().backward()
    y_ref, gx_ref, grads_ref, aux_ref = refs[rank]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.counts_E, aux_ref.counts_E)
    torch.testing.assert_close(aux.kept_E, aux_ref.kept_E)
    L = E // ep
    lo = par.ep_rank * L
    group = [par.edp_rank * ep + i for i in range(ep)]   # dp ranks of my EP group (tp = 1)
    for name, p in layer.named_parameters():
        if name.startswith("experts."):
            want = sum(refs[r][2][name] for r in group)[lo:lo + L]
        else:
            want = grads_ref[name]
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)
    return aux.recv_tokens


def _cases_body(rank, world, ep, cases):
    """Several layer configurations in one process group (spawning ranks costs seconds)."""
    par = init_parallel(world, 1, ep, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    return [_body(par, rank, world, ep, *case) for case in cases]


ROUTING_CASES = [(2, None, 0, None), (2, 1.0, 0, None), (1, 0.5, 0, None)]


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_ep_layer_matches_single_process(world, ep):
    """k=2 dropless, k=2 with drops, k=1 with heavy drops; ep=2, ep=4, and dp=4 x ep=2."""
    run_dist(_cases_body, world, (ep, ROUTING_CASES))


def test_ep_layer_shared_experts_overlap():
    run_dist(_cases_body, 2, (2, [(2, 1.0, 1, None)]))


@pytest.mark.slow
def test_all_tokens_to_one_expert():
    """At top-1 every token picks expert 0: ranks 1-3 receive nothing from anyone. No hang, exact
    results, and with capacity 1.0 (C = ceil(1*1*10/8) = 2 per source rank) the drops are counted."""
    recv = run_dist(_cases_body, 4, (4, [(1, None, 0, 0), (1, 1.0, 0, 0)]))
    assert [r[0] for r in recv] == [4 * T, 0, 0, 0]
    assert [r[1] for r in recv] == [4 * 2, 0, 0, 0]
