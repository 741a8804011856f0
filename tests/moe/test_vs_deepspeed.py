"""Our routing math against DeepSpeed 0.19's top1gating / top2gating (use_rts=False,
top2_2nd_expert_sampling=False, drop_tokens=True) on 72 fixed-logit cases per router: what agrees
and the differences README's "Routing: where we differ from DeepSpeed" states.

  both      capacity, per-expert counts before the cut, copies kept per expert
  top-1     aux loss = the Switch loss (E * sum f * P); the KEPT TOKEN SET differs where tokens are
            dropped (DeepSpeed keeps topk of a 0/1 mask over tokens, we keep the first C in order)
  top-2     kept set (first choices fill buffers first); aux loss = our gshard loss (first choices
            only, E^2 * mean(me * ce)); combine weights equal only with moe.renormalize_after_drop
            (DeepSpeed renormalizes a lone survivor to 1, we keep g / (g1 + g2) as GShard does)
"""
from __future__ import annotations

import itertools

import pytest
import torch

from moetrain.moe import routing as R

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="deepspeed not installed")

CASES = list(itertools.product(range(3), (8, 16, 32), (4, 8), (0.5, 1.0, 1.25, 2.0)))   # 72


def _ours(logits, k, cf, renormalize):
    sel = R.select_topk(logits, k, normalize=k > 1)
    T, E = logits.shape
    r = R.apply_capacity(sel, E, R.expert_capacity(T, E, k, cf, 1))
    if renormalize:
        r = R.renormalize_kept(r)
    weights_TE = torch.zeros(T, E).scatter_add_(1, r.expert_idx_TK, r.weights_TK * r.kept_TK)
    kept_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, r.expert_idx_TK, r.kept_TK)
    return sel, r, weights_TE, kept_TE


def _compare(k: int, renormalize: bool = False) -> dict:
    agree = dict.fromkeys(("capacity", "counts", "kept_per_expert", "kept_set", "weights", "aux"), 0)
    for seed, T, E, cf in CASES:
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
        if k == 1:
            l_aux, comb, disp, counts = sharded_moe.top1gating(logits, cf, 1, use_rts=False, drop_tokens=True)
        else:
            l_aux, comb, disp, counts = sharded_moe.top2gating(logits, cf, 1, drop_tokens=True,
                                                               top2_2nd_expert_sampling=False)
        sel, r, weights_TE, kept_TE = _ours(logits, k, cf, renormalize)
        aux = (R.load_balancing_loss(sel.probs_TE, sel.expert_idx_TK) if k == 1
               else R.gshard_aux_loss(sel.probs_TE, sel.expert_idx_TK[:, 0]))
        agree["capacity"] += comb.shape[-1] == r.capacity
        agree["counts"] += torch.equal(counts.long(), r.counts_E.long())
        agree["kept_per_expert"] += torch.equal(disp.any(-1).sum(0), kept_TE.sum(0))
        agree["kept_set"] += torch.equal(disp.any(-1), kept_TE)
        agree["weights"] += torch.allclose(comb.sum(-1), weights_TE, atol=1e-6)
        agree["aux"] += torch.allclose(l_aux, aux, atol=1e-6)
    return agree


def test_top1_agrees_except_which_tokens_are_kept():
    a = _compare(1)
    n = len(CASES)
    assert (a["capacity"], a["counts"], a["kept_per_expert"], a["aux"]) == (n, n, n, n), a
    assert a["kept_set"] < n and a["kept_set"] == a["weights"], a     # the kept set decides the weights


def test_top2_kept_set_agrees_weights_only_with_renormalize_after_drop():
    n = len(CASES)
    plain = _compare(2)
    assert all(plain[key] == n for key in ("capacity", "counts", "kept_per_expert", "kept_set", "aux")), plain
    assert plain["weights"] < n, plain                                 # a lone survivor: g/(g1+g2) vs 1
    assert _compare(2, renormalize=True)["weights"] == n
