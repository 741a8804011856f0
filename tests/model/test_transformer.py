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


# ----------------------------------------------------------------------------- grouped-query attention

def _mha_twin(cfg, model):
    """A multi-head (n_kv_heads = n_heads) model holding `model`'s weights with each K/V head's
    rows repeated for the query heads that read it: the reference GQA must equal."""
    from moetrain.config import replace_keys
    ref_cfg = replace_keys(cfg, {"model.n_kv_heads": None})
    ref = Transformer(ref_cfg)
    sd = model.state_dict()
    Dh, rep = cfg.model.head_dim, cfg.model.n_heads // cfg.model.kv_heads
    for k in list(sd):
        if k.endswith(("attn.wk.weight", "attn.wv.weight")):
            w = sd[k]
            sd[k] = w.reshape(-1, Dh, w.shape[1]).repeat_interleave(rep, 0).reshape(-1, w.shape[1])
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_equals_multi_head_with_repeated_kv_heads(kv):
    cfg, model = build("model.n_heads=4", f"model.n_kv_heads={kv}", "moe.capacity_factor=null", "train.device=cpu")
    attn = model.layers[0].attn
    assert (attn.n_heads, attn.n_kv_heads) == (4, kv)
    assert tuple(attn.wk.weight.shape) == tuple(attn.wv.weight.shape) == (kv * DIM // 4, DIM)
    ref = _mha_twin(cfg, model)
    x = tokens()
    got, _ = model(x)
    want, _ = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # fewer parameters: wk, wv lose (1 - kv/heads) of their rows in every layer
    assert count_params(ref, cfg)[0] - count_params(model, cfg)[0] == N_LAYERS * 2 * DIM * (DIM - kv * DIM // 4)


def test_multi_head_attention_is_the_plain_sdpa_call():
    """n_kv_heads null (or = n_heads) runs the multi-head path: one causal SDPA call on q, k, v
    with one K/V head per query head, bit for bit."""
    import torch.nn.functional as F
    from moetrain.model.transformer import apply_rope
    for extra in ((), ("model.n_kv_heads=2",)):
        cfg, model = build(*extra, "train.device=cpu")
        attn = model.layers[0].attn
        assert not attn.gqa
        x = torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(3))
        q, k, v = (lin(x).view(2, SEQ, -1, attn.head_dim).transpose(1, 2) for lin in (attn.wq, attn.wk, attn.wv))
        cos, sin = model.rope_cos[:SEQ], model.rope_sin[:SEQ]
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        want = attn.wo(y.transpose(1, 2).reshape(2, SEQ, -1))
        assert torch.equal(attn(x, model.rope_cos, model.rope_sin), want)


def test_gqa_backward_reaches_every_parameter():
    cfg, model = build("model.n_heads=4", "model.n_kv_heads=2", "moe.capacity_factor=null", "train.device=cpu")
    logits, auxes = model(tokens())
    (logits.float().logsumexp(-1).mean() + sum(a.aux_loss for a in auxes)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------- dense first layers

@pytest.mark.parametrize("first, every, kinds", [
    (1, 1, [False, True, True, True]),
    (2, 1, [False, False, True, True]),
    (1, 2, [False, True, False, True]),
    (2, 2, [False, False, False, True]),
])
def test_first_dense_layers_kinds_and_keys(first, every, kinds):
    cfg, model = build(f"moe.first_dense_layers={first}", f"moe.every={every}", "train.device=cpu")
    assert [b.is_moe for b in model.layers] == kinds
    from moetrain.config import is_moe_layer
    from moetrain import growth
    from moetrain.hf import mapping
    for rule in (is_moe_layer, growth.is_moe_layer, mapping.is_moe_layer):      # one rule everywhere
        assert [rule(cfg, i) for i in range(N_LAYERS)] == kinds
    keys = model.state_dict().keys()
    for i, moe in enumerate(kinds):
        assert (f"layers.{i}.ffn.experts.w1" in keys) == moe
        assert (f"layers.{i}.ffn.w1.weight" in keys) == (not moe)
        if not moe:
            assert tuple(model.layers[i].ffn.w1.weight.shape) == (cfg.model.ffn_hidden, DIM)
    logits, auxes = model(tokens())
    assert len(auxes) == sum(kinds) == len(model.moe_layers()) and logits.shape == (2, SEQ, V)


def test_first_dense_layers_count_params():
    cfg, moe = build("train.device=cpu")
    cfg1, first = build("moe.first_dense_layers=1", "train.device=cpu")
    (t0, a0), (t1, a1) = count_params(moe, cfg), count_params(first, cfg1)
    dense_ffn = 3 * DIM * cfg.model.ffn_hidden
    moe_ffn_total = 4 * 3 * DIM * cfg.expert_hidden + 4 * DIM          # experts + router
    moe_ffn_active = 2 * 3 * DIM * cfg.expert_hidden + 4 * DIM
    assert t0 - t1 == moe_ffn_total - dense_ffn and a0 - a1 == moe_ffn_active - dense_ffn


def test_first_dense_layers_gqa_short_training_run_and_checkpoint(tmp_path):
    """World 1 through the real trainer: 4 steps of a GQA model with a dense first layer, saved
    at step 2; the checkpoint holds the dense layer's SwiGLU and the K/V projections at
    n_kv_heads rows; resuming continues the loss curve exactly."""
    import json
    from moetrain.checkpoint.convert import read_checkpoint
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    from moetrain.train.loop import run_training
    common = ["model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
              "model.ffn_hidden=64", "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=null",
              "moe.first_dense_layers=1", "train.seq_len=32", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.steps=4", "train.warmup_steps=1", "train.eval_every=0",
              "train.eval_batches=1", "train.progress=false", "train.num_threads=1", "train.device=cpu",
              "logging.every=1", "logging.tensorboard=false", "checkpoint.every=2"]

    def run(name, extra=()):
        cfg = load_config("configs/tiny_cpu.yaml", common + [f"logging.dir={tmp_path / 'runs'}",
                                                             f"logging.run_name={name}",
                                                             f"checkpoint.dir={tmp_path / name}", *extra])
        par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
        torch.manual_seed(0)
        run_training(cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size),
                     log=lambda m: None)
        with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    torch.set_num_threads(1)
    straight = run("a")
    assert sorted(straight) == [1, 2, 3, 4] and straight[4] < straight[1]
    _, full = read_checkpoint(str(tmp_path / "a" / "step_00000002"))
    sd = full["model"]
    assert tuple(sd["layers.0.ffn.w1.weight"].shape) == (64, 32)                  # dense first layer
    assert "layers.0.ffn.experts.w1" not in sd and "layers.1.ffn.experts.w1" in sd
    assert tuple(sd["layers.1.attn.wk.weight"].shape) == tuple(sd["layers.1.attn.wv.weight"].shape) == (16, 32)
    resumed = run("b", [f"checkpoint.resume={tmp_path / 'a' / 'step_00000002'}"])
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [straight[3], straight[4]]
