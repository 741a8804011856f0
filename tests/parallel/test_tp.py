"""Tensor parallelism (DTensor: model/tp_plan.py, parallel/tp.py) composed with data and expert parallelism.

1. TP layers == unsharded layers (world 2, tp=2): attention, dense FFN, embedding + head +
   vocab-parallel CE, whole models (incl. etp experts, tied embeddings): outputs and gradients.
2. The central property (DESIGN.md) under TP: with capacity_factor null, every (dp, tp, ep[, etp])
   layout (also with PEER layers) reproduces the world-1 loss, grad-norm, aux-loss and val-loss
   curves, its synced gradients equal world 1's (sliced to the local shard), the logged expert
   counts equal world 1's, and the parameters that are replicated over tp stay bitwise identical
   across the TP group (also under GShard's random routing: TP peers share one RNG stream).
   Grouped-query attention with a dense first layer: layers at tp=2 equal world 1, a tp=2 run
   equals world 1 and its checkpoint resumes at world 1.
3. Config validation of illegal combinations.

Each world size runs all its layouts in ONE run_dist call (one process group, one mesh per layout).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from _dist import run_dist
from _train import TINY_3D, run_training_keep_trainer
from moetrain.config import ConfigError, load_config, validate_layout

TINY = TINY_3D
CONFIG = "configs/tiny_cpu.yaml"


def _env(rank, world):
    from moetrain.parallel.mesh import LaunchEnv
    return LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The global tensor of a TP-sharded DTensor (gathered over tp), a plain tensor as is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _experts(full: torch.Tensor, like: torch.Tensor, expert_offset=None) -> torch.Tensor:
    """The rows of a world-1 tensor that a rank's EP shard `like` holds (all without EP)."""
    return full if expert_offset is None else full[expert_offset:expert_offset + like.shape[0]]


# ---------------------------------------------------------------------------------------------
# 1. layers (world 2, tp=2)

def _layers_body(rank, world):
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Shard

    from moetrain.model.tp_plan import apply_tp
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.mesh import init_parallel
    from moetrain.parallel.tp import cross_entropy_sum

    par = init_parallel(1, 2, 1, _env(rank, world), "cpu")
    close = {"rtol": 1e-5, "atol": 1e-6}
    checked = []
    for extra, etp in ((["model.tie_embeddings=false"], False), (["model.tie_embeddings=true"], True)):
        cfg = load_config(CONFIG, TINY + extra + ["parallel.tp=2", f"parallel.etp={etp}"])
        full = Transformer(cfg)
        full.init_weights(cfg.train.seed)
        sharded = copy.deepcopy(full)
        apply_tp(sharded, par.tp_mesh, etp)
        g = torch.Generator().manual_seed(7)
        B, S, D = 2, 16, cfg.model.dim
        cos, sin = full.rope_cos, full.rope_sin

        # attention and the dense FFN: same output, same input grad, sliced weight grads
        for name, call in (("attn", lambda m, x, cos=cos, sin=sin: m.layers[0].attn(x, cos, sin)),
                           ("ffn", lambda m, x: m.layers[0].ffn(x))):
            x = torch.randn(B, S, D, generator=g)
            dy = torch.randn(B, S, D, generator=g)
            outs = []
            for model in (full, sharded):
                xi = x.clone().requires_grad_()
                y = call(model, xi)
                (y * dy).sum().backward()
                outs.append((y.detach(), xi.grad))
            torch.testing.assert_close(outs[1][0], outs[0][0], **close, msg=name)
            torch.testing.assert_close(outs[1][1], outs[0][1], **close, msg=name)
            checked.append(name)

        # embedding + head + vocab-parallel CE, then the whole model: loss and every gradient
        full.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g)
        x_full = full.embed(tokens[:, :-1])
        x_tp = sharded.embed(tokens[:, :-1])
        torch.testing.assert_close(x_tp, x_full, rtol=0, atol=0, msg="embedding")
        logits_full, _ = full(tokens[:, :-1])
        logits_tp, _ = sharded(tokens[:, :-1])
        assert isinstance(logits_tp, DTensor) and logits_tp.placements == (Shard(2),)      # vocab shard
        torch.testing.assert_close(logits_tp.to_local(), logits_full.chunk(2, -1)[par.tp_rank], **close, msg="logits")
        ce_full = F.cross_entropy(logits_full.float().reshape(-1, cfg.model.vocab_size),
                                  tokens[:, 1:].reshape(-1), reduction="sum")
        ce_tp = cross_entropy_sum(logits_tp, tokens[:, 1:])
        torch.testing.assert_close(ce_tp, ce_full, rtol=1e-6, atol=0, msg="vocab-parallel CE")
        (ce_full / tokens[:, 1:].numel()).backward()
        (ce_tp / tokens[:, 1:].numel()).backward()
        full_params = dict(full.named_parameters())
        num_sharded = 0
        for pname, p in sharded.named_parameters():
            want = full_params[pname]
            torch.testing.assert_close(_full(p.grad), want.grad, rtol=1e-4, atol=1e-7, msg=pname)
            # a sharded parameter is a DTensor whose placement says how: this rank holds its chunk
            # of the world-1 tensor along the Shard dim (what checkpoints and grad norms read)
            if isinstance(p, DTensor):
                num_sharded += 1
                (placement,) = p.placements
                assert p.grad.placements == p.placements, (pname, p.grad.placements)
                assert torch.equal(p.to_local(), want.detach().chunk(2, placement.dim)[par.tp_rank]), pname
            else:
                assert torch.equal(p.detach(), want.detach()), pname
        # wq wk wv wo, dense w1 w3 w2, shared w1 w3 w2, embed, head (x2 layers of attention)
        expect = 4 * 2 + 3 + 3 + 1 + (0 if cfg.model.tie_embeddings else 1) + (3 if etp else 0)
        assert num_sharded == expect, (num_sharded, expect)
        checked.append(f"model etp={etp} tied={cfg.model.tie_embeddings}")
    return checked


def test_tp_layers_match_unsharded():
    checked = run_dist(_layers_body, 2)
    assert checked[0] == checked[1] and len(checked[0]) == 6


# grouped-query attention (4 query heads, 2 K/V heads: one of each per TP rank at tp=2) and a
# dense first layer followed by MoE layers
GQA = ["model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=3", "moe.every=1", "moe.first_dense_layers=1",
       "train.device=cpu"]


def _gqa_layers_body(rank, world):
    """tp=2 vs the unsharded model for GQA + a dense first layer: each rank holds whole K/V heads
    (wk/wv local rows = n_kv_heads/tp * Dh), logits, CE and every gradient equal world 1's."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from moetrain.model.tp_plan import apply_tp
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.mesh import init_parallel
    from moetrain.parallel.tp import cross_entropy_sum

    par = init_parallel(1, 2, 1, _env(rank, world), "cpu")
    cfg = load_config(CONFIG, TINY + GQA + ["parallel.tp=2"])
    full = Transformer(cfg)
    full.init_weights(cfg.train.seed)
    sharded = copy.deepcopy(full)
    apply_tp(sharded, par.tp_mesh)
    Dh = cfg.model.head_dim
    wk = sharded.layers[0].attn.wk.weight
    assert isinstance(wk, DTensor) and tuple(wk.to_local().shape) == (cfg.model.kv_heads // 2 * Dh, cfg.model.dim)
    assert [b.is_moe for b in sharded.layers] == [False, True, True]
    g = torch.Generator().manual_seed(11)
    B, S = 2, 16
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g)
    logits_full, _ = full(tokens[:, :-1])
    logits_tp, _ = sharded(tokens[:, :-1])
    torch.testing.assert_close(logits_tp.to_local(), logits_full.chunk(2, -1)[par.tp_rank], rtol=1e-5, atol=1e-6)
    ce_full = F.cross_entropy(logits_full.float().reshape(-1, cfg.model.vocab_size), tokens[:, 1:].reshape(-1),
                              reduction="sum")
    ce_tp = cross_entropy_sum(logits_tp, tokens[:, 1:])
    torch.testing.assert_close(ce_tp, ce_full, rtol=1e-6, atol=0)
    ce_full.backward()
    ce_tp.backward()
    full_params = dict(full.named_parameters())
    names = []
    for pname, p in sharded.named_parameters():
        torch.testing.assert_close(_full(p.grad), full_params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
        names.append(pname)
    return sorted(names)


def test_tp_gqa_first_dense_matches_unsharded():
    names = run_dist(_gqa_layers_body, 2)
    assert names[0] == names[1] and "layers.0.ffn.w1.weight" in names[0] and "layers.1.ffn.experts.w1" in names[0]


def _gqa_train_body(rank, world, log_dir, ckpt_dir, extra):
    """4 steps of the GQA + dense-first model at this world's layout; rank 0's losses."""
    import random

    import numpy as np

    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel
    from moetrain.train.loop import run_training

    cfg = load_config(CONFIG, TINY + GQA + ["train.steps=4", f"logging.dir={log_dir}",
                                            f"checkpoint.dir={ckpt_dir}", *extra])
    dp, tp, ep = validate_layout(cfg, world)
    par = init_parallel(dp, tp, ep, _env(rank, world), "cpu")
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    run_training(cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size), log=lambda m: None)
    return {r["step"]: r["loss"] for r in _records(os.path.join(log_dir, cfg.logging.run_name))} if rank == 0 else None


@pytest.mark.slow
def test_tp2_gqa_run_matches_world1_and_resumes_at_world1(tmp_path):
    """GQA + a dense first layer: a tp=2 run's loss curve equals world 1's, and its tp=2
    checkpoint (K/V heads sharded over tp) resumes at world 1 and continues the curve."""
    torch.set_num_threads(1)
    tp2 = run_dist(_gqa_train_body, 2, (str(tmp_path / "a"), str(tmp_path / "ck"),
                                        ["parallel.tp=2", "checkpoint.every=2"]), timeout_s=300)[0]
    w1 = _gqa_train_body(0, 1, str(tmp_path / "w1"), str(tmp_path / "ck_w1"), [])
    assert sorted(tp2) == sorted(w1) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([tp2[s] for s in range(1, 5)]), torch.tensor([w1[s] for s in range(1, 5)]),
                               rtol=2e-5, atol=0)
    resumed = _gqa_train_body(0, 1, str(tmp_path / "b"), str(tmp_path / "ck_b"),
                              [f"checkpoint.resume={tmp_path / 'ck' / 'step_00000002'}"])
    assert sorted(resumed) == [3, 4]
    torch.testing.assert_close(torch.tensor([resumed[3], resumed[4]]), torch.tensor([tp2[3], tp2[4]]),
                               rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. layouts reproduce world 1

def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _layouts_body(rank, world, log_dir, layouts):
    """For each layout: synced step-0 gradients, then a 5-step run's metrics (rank 0) and the
    tp-replicated parameters at the end (every rank)."""
    from torch.distributed.tensor import DTensor

    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel
    from moetrain.train import loop

    out = {}
    data = None
    for name, extra, _ in layouts:
        cfg = load_config(CONFIG, TINY + extra + [f"logging.dir={log_dir}", f"logging.run_name={name}"])
        dp, tp, ep = validate_layout(cfg, world)
        par = init_parallel(dp, tp, ep, _env(rank, world), "cpu")
        data = data or load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
        trainer = loop.build_trainer(cfg, par, data)
        trainer.compute_gradients(step=0)
        modules = dict(trainer.model.named_modules())
        grads = {}
        for pname, p in trainer.model.named_parameters():
            owner = modules[pname.rsplit(".", 1)[0]]
            offset = getattr(owner, "expert_offset", None)       # GroupedExperts
            if pname.rsplit(".", 1)[1].startswith("expert_"):      # PEER expert tables
                offset = owner.row_offset
            grads[pname] = (offset, _full(p.grad).clone())

        trainer = run_training_keep_trainer(cfg, par, data)
        model = trainer.model
        replicated = {n: p.detach().clone() for n, p in model.named_parameters() if not isinstance(p, DTensor)}
        out[name] = {"grads": grads, "replicated": replicated, "tp_rank": par.tp_rank,
                     "records": _records(os.path.join(log_dir, name)) if rank == 0 else None}
    return out


# world-1 reference runs: name -> overrides (on top of TINY)
PEER = ["moe.layer=peer", "moe.peer.num_keys=8", "moe.peer.top_k=4", "moe.peer.key_dim=16"]
REFS = {"base": [], "peer": PEER}
# (run name, overrides, world-1 reference to match or None)
WORLD4 = [("tp2_dp2_ep2", ["parallel.tp=2", "parallel.ep=2"], "base"),
          ("tp2_dp2_ep2_etp", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=true"], "base"),
          ("tp2_dp2_ep1", ["parallel.tp=2", "parallel.ep=1"], "base"),
          ("tp2_dp2_ep2_peer", ["parallel.tp=2", "parallel.ep=2"] + PEER, "peer"),
          # random routing: TP peers must draw the same numbers (one RNG stream per dp rank)
          ("tp2_dp2_ep2_gshard", ["parallel.tp=2", "parallel.ep=2", "moe.router=gshard"], None)]
WORLD8 = [("tp2_dp4_ep2", ["parallel.tp=2", "parallel.ep=2"], "base"),
          ("tp2_dp4_ep4_etp", ["parallel.tp=2", "parallel.ep=4", "parallel.etp=true"], "base")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    return _layouts_body(0, 1, str(tmp_path_factory.mktemp("w1")), [(k, v, k) for k, v in REFS.items()])


def _check_layout(refs, per_rank, name, ref_name):
    """Loss/grad-norm curves, step-0 gradients, expert counts, replicas across tp."""
    compare = ref_name is not None
    ref = refs[ref_name or "base"]
    got = per_rank[0][name]["records"]
    want = ref["records"]
    assert len(got) == len(want) == 5
    if compare:
        for key in ("loss", "grad_norm", "aux_loss"):
            torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                       rtol=2e-5, atol=0, msg=f"{name} {key}")
        torch.testing.assert_close(got[-1]["val_loss"], want[-1]["val_loss"], rtol=2e-5, atol=0)
        # TP ranks route the same tokens; metrics.summarize counts them once
        for key in ("moe.layer0.routed", "moe.layer0.kept"):
            assert got[0].get(key) == want[0].get(key), (name, key)

    by_tp_rank: dict = {}
    for rank_out in per_rank:
        res = rank_out[name]
        for pname, (offset, g) in res["grads"].items():
            if not compare:
                break
            want_g = _experts(ref["grads"][pname][1], g, offset)
            torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-7, msg=lambda m, n=name, p=pname: f"{n} {p}: {m}")
        by_tp_rank.setdefault(res["tp_rank"], []).append(res["replicated"])
    # parameters whole on every TP rank (norms, routers, experts without etp, PEER) received
    # bitwise identical updates: their gradients need no reduction over tp
    for dp_idx in range(len(by_tp_rank[0])):
        peers = [by_tp_rank[t][dp_idx] for t in sorted(by_tp_rank)]
        for pname, p in peers[0].items():
            for other in peers[1:]:
                assert torch.equal(other[pname], p), f"{name}: {pname} diverged across tp"


@pytest.mark.slow
def test_world4_tp2_layouts_match_world1(reference, tmp_path):
    torch.set_num_threads(1)
    per_rank = run_dist(_layouts_body, 4, (str(tmp_path), WORLD4), timeout_s=300)
    for name, _, ref_name in WORLD4:
        _check_layout(reference, per_rank, name, ref_name)


@pytest.mark.slow
def test_world8_tp2_layouts_match_world1(reference, tmp_path):
    torch.set_num_threads(1)
    per_rank = run_dist(_layouts_body, 8, (str(tmp_path), WORLD8), timeout_s=600)
    for name, _, ref_name in WORLD8:
        _check_layout(reference, per_rank, name, ref_name)


# ---------------------------------------------------------------------------------------------
# 3. config validation

def _error(overrides, world=None):
    with pytest.raises(ConfigError) as info:
        cfg = load_config(CONFIG, TINY + overrides)
        if world is not None:
            validate_layout(cfg, world)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("overrides,key,needle", [
    (["parallel.tp=4"], "parallel.tp=4", "model.n_heads=2"),
    (["parallel.tp=2", "model.n_heads=4", "model.n_kv_heads=1"], "parallel.tp=2", "model.n_kv_heads=1"),
    (["parallel.tp=2", "model.ffn_hidden=63", "moe.expert_hidden=16", "moe.every=1", "moe.first_dense_layers=1"],
     "parallel.tp=2", "model.ffn_hidden=63"),
    (["parallel.tp=2", "model.n_heads=2", "model.vocab_size=255"], "parallel.tp=2", "model.vocab_size=255"),
    (["parallel.tp=2", "model.ffn_hidden=63", "moe.expert_hidden=16"], "parallel.tp=2", "model.ffn_hidden=63"),
    (["parallel.tp=2", "moe.expert_hidden=15"], "parallel.tp=2", "shared-expert hidden size 15"),
    (["parallel.tp=0"], "parallel.tp=0", ">= 1"),
    (["parallel.etp=true"], "parallel.etp=True", "parallel.tp > 1"),
    (["parallel.tp=2", "parallel.etp=true", "moe.num_experts=0", "moe.shared_experts=0"], "parallel.etp=True",
     "moe.num_experts > 0"),
    (["parallel.tp=2", "parallel.etp=true", "moe.expert_hidden=30", "moe.shared_experts=0",
      "moe.expert_granularity=2"], "parallel.etp=True", "expert hidden size 15"),
])
def test_config_rejects_illegal_tp(overrides, key, needle):
    msg = _error(overrides)
    assert key in msg and needle in msg, msg


def test_config_tp_layout():
    assert _error(["parallel.tp=2"], world=3).startswith("parallel.tp=2")       # tp must divide world
    cfg = load_config(CONFIG, TINY + ["parallel.tp=2", "parallel.ep=2"])
    assert validate_layout(cfg, 8) == (4, 2, 2)
    assert "parallel.ep=2" in _error(["parallel.tp=2", "parallel.ep=2"], world=2)  # dp=1
    # dense FFN hidden only matters when a dense layer exists
    cfg = load_config(CONFIG, TINY + ["parallel.tp=2", "model.ffn_hidden=63", "moe.every=1",
                                      "moe.expert_hidden=16"])
    assert cfg.parallel.tp == 2
