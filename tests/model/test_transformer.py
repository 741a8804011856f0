"""Decoder LM (moetrain.model.transformer): shapes, aux entries, layout-independent init, params, causality."""
from __future__ import annotations

import copy

import pytest
import torch

from moetrain.config import load_config
from moetrain.model.transformer import Transformer, count_params
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoEAux, MoELayer

V, DIM, N_LAYERS, N_HEADS, SEQ = 64, 32, 4, 2, 16


def tiny_cfg(*overrides):
    base = [f"model.vocab_size={V}", f"model.dim={DIM}", f"model.n_layers={N_LAYERS}",
            f"model.n_heads={N_HEADS}", f"model.max_seq_len={SEQ}", "model.ffn_hidden=48",
            "moe.num_experts=4", "moe.top_k=2", f"train.seq_len={SEQ}"]
    return load_config(None, base + list(overrides))


def build(*overrides, seed=0):
    cfg = tiny_cfg(*overrides)
    model = Transformer(cfg)
    model.init_weights(seed)
    return cfg, model


def tokens(batch=2, seq=SEQ, seed=0):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("every, num_moe", [(1, 4), (2, 2), (3, 1), (4, 1)])
def test_logits_shape_and_aux_entries(every, num_moe):
    cfg, model = build(f"moe.every={every}")
    logits, auxes = model(tokens(batch=3))
    assert logits.shape == (3, SEQ, V)
    assert len(auxes) == num_moe == len(model.moe_layers())
    assert all(isinstance(a, MoEAux) for a in auxes)
    # layer i is MoE when (i + 1) % every == 0
    assert [b.is_moe for b in model.layers] == [(i + 1) % every == 0 for i in range(N_LAYERS)]
    assert torch.isfinite(logits).all()


def test_dense_model_has_no_aux():
    cfg, model = build("moe.num_experts=0")
    logits, auxes = model(tokens())
    assert logits.shape == (2, SEQ, V)
    assert auxes == []
    assert model.moe_layers() == []
    assert not any(isinstance(m, (GroupedExperts, MoELayer)) for m in model.modules())


def test_forward_backward_reaches_every_parameter():
    cfg, model = build("moe.capacity_factor=null")
    logits, auxes = model(tokens())
    loss = logits.float().logsumexp(-1).mean() + sum(a.aux_loss + a.z_loss for a in auxes)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_init_weights_deterministic_and_seed_dependent():
    _, a = build(seed=5)
    _, b = build(seed=5)
    _, c = build(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["layers.0.ffn.experts.w1"], sc["layers.0.ffn.experts.w1"])
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    # norms are ones, everything else is filled (no leftover torch.empty garbage)
    assert torch.equal(sa["norm.weight"], torch.ones(DIM))
    for k, v in sa.items():
        assert torch.isfinite(v).all(), k


def test_init_weights_is_independent_of_expert_sharding():
    cfg = tiny_cfg()
    full = Transformer(cfg)
    shard = copy.deepcopy(full)
    for layer in shard.moe_layers():
        layer.experts.shard_(2, 2)                 # keep experts [2, 4) of 4
    # initialize the shard FIRST, with different garbage in the full model: order must not matter
    shard.init_weights(11)
    full.init_weights(11)
    full_sd, shard_sd = full.state_dict(), shard.state_dict()
    assert full_sd.keys() == shard_sd.keys()
    for k, v in shard_sd.items():
        if ".experts." in k:
            assert v.shape[0] == 2
            assert torch.equal(v, full_sd[k][2:4]), k
        else:
            assert torch.equal(v, full_sd[k]), k
    for layer in shard.moe_layers():
        assert layer.experts.expert_offset == 2


def test_count_params_dense_and_moe():
    cfg, dense = build("moe.num_experts=0")
    total, active = count_params(dense, cfg)
    assert total == active == sum(p.numel() for p in dense.parameters())

    cfg, moe = build()
    total, active = count_params(moe, cfg)
    assert total == sum(p.numel() for p in moe.parameters())     # all 4 experts held locally
    assert active < total
    H = cfg.expert_hidden
    per_expert = 3 * DIM * H
    # active swaps num_experts experts for top_k of them in every MoE layer
    assert total - active == N_LAYERS * per_expert * (4 - 2)


def test_count_params_counts_the_full_model_on_a_shard():
    cfg, full = build()
    shard = copy.deepcopy(full)
    for layer in shard.moe_layers():
        layer.experts.shard_(1, 1)
    assert count_params(shard, cfg) == count_params(full, cfg)


def test_count_params_tied_embeddings_counted_once():
    cfg, model = build("model.tie_embeddings=true")
    assert model.head.weight is model.embed.weight
    total, _ = count_params(model, cfg)
    assert total == sum(p.numel() for p in model.parameters())   # parameters() deduplicates


@pytest.mark.parametrize("overrides", [("moe.capacity_factor=null",), ("moe.num_experts=0",),
                                       ("moe.capacity_factor=null", "moe.every=2", "moe.shared_experts=1")])
def test_causal_future_tokens_do_not_change_earlier_logits(overrides):
    # capacity_factor null: with a capacity, a later token can take an earlier one's expert slot
    _, model = build(*overrides)
    model.eval()
    a = tokens(batch=1)
    j = 9
    b = a.clone()
    b[0, j:] = (b[0, j:] + 1 + torch.arange(SEQ - j)) % V
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    torch.testing.assert_close(la[:, :j], lb[:, :j], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, j:], lb[:, j:])


def test_shorter_sequence_than_max_seq_len():
    _, model = build()
    logits, auxes = model(tokens(batch=2, seq=5))
    assert logits.shape == (2, 5, V) and len(auxes) == N_LAYERS
