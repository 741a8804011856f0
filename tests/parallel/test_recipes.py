"""Every routing recipe in configs/ trains end to end under parallel.ep=2 at world 2 (gloo), and
the deterministic ones reproduce their world-size-1 loss curve (DESIGN.md: determinism across
layouts).

Model size and batch are shrunk for speed (TINY); each recipe keeps its own routing keys.
capacity_factor is set to null where the recipe allows it; expert_choice (capacity-bound by
definition) and reroute (needs a capacity to overflow) keep theirs: capacity is applied per
source rank's micro batch, and the micro batches are the same sequences in every layout, so
they must match too. gshard and noisy_topk draw their randomness per rank: smoke test only
(plus: two runs with the same seed are identical).

All world-2 runs share one process group (one run_dist call); world 1 runs in this process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _dist import run_dist

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=3",
        "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
        "logging.every=1", "logging.tensorboard=false", "checkpoint.every=0"]

NULL_CAP = ["moe.capacity_factor=null"]
# run name -> (recipe, extra overrides, compare with world 1)
RUNS = {
    "switch": ("switch", NULL_CAP + ["moe.router_jitter=0"], True),
    "switch_jitter": ("switch", [], False),          # the recipe as written: jitter is per-rank random
    "gshard": ("gshard", [], False),
    "gshard_again": ("gshard", [], False),
    "noisy_topk": ("noisy_topk", [], False),
    "expert_choice": ("expert_choice", [], True),
    "aux_free": ("aux_free", NULL_CAP, True),
    "deepseek": ("deepseek", NULL_CAP, True),
    "moepp": ("moepp", NULL_CAP, True),
    "peer": ("peer", [], True),
    "peer_no_bn": ("peer", ["moe.peer.query_bn=false"], True),   # isolates the BatchNorm eval bug below
    "reroute": ("reroute", [], True),
    "shared_fine": ("shared_fine", ["moe.expert_hidden=32"], True),   # dropless already
    "reroute_residual": ("reroute", ["moe.overflow=residual"], False),
}
RECIPES = sorted({r for r, _, _ in RUNS.values()})
COMPARED = [name for name, (_, _, cmp) in RUNS.items() if cmp]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_recipe_has_a_config_and_a_run():
    assert RECIPES == ["aux_free", "deepseek", "expert_choice", "gshard", "moepp", "noisy_topk", "peer",
                       "reroute", "shared_fine", "switch"]
    # tested elsewhere: tiny_cpu and dense everywhere, the published shapes in tests/model/test_real_shapes.py,
    # peer_1m (peer at N = 1024^2 with sparse updates) in tests/moe/test_peer_sparse.py
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")} - {"tiny_cpu", "dense", "mixtral_8x7b", "deepseek_moe_16b",
                                                          "peer_1m"}
    assert shipped == set(RECIPES), "a recipe in configs/ without a run here (or the reverse)"
    for recipe in RECIPES:
        assert (CONFIGS / f"{recipe}.yaml").is_file(), recipe


def _config(name, log_dir, ep):
    from moetrain.config import load_config
    recipe, extra, _ = RUNS[name]
    return load_config(str(CONFIGS / f"{recipe}.yaml"), TINY + extra + [
        f"parallel.ep={ep}", f"logging.dir={log_dir}", f"logging.run_name={name}",
        f"checkpoint.dir={os.path.join(log_dir, 'ckpt_' + name)}"])


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_all(rank, world, log_dir, names):
    """Train each run in turn on one process group; return per run what the tests check."""
    from moetrain.config import validate_layout
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    from moetrain.train import loop

    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = None
    data = None
    out = {}
    for name in names:
        cfg = _config(name, log_dir, ep=world)
        dp, tp, ep = validate_layout(cfg, world)
        if par is None:
            par = init_parallel(dp, tp, ep, env, "cpu")
            data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
        assert (par.dims.dp, par.dims.ep) == (dp, ep)
        model = loop.run_training(cfg, par, data, log=lambda m: None).trainer.model
        res = {"bias": [layer.router.expert_bias.clone() for layer in model.moe_layers()
                        if layer.router.spec.bias_state]}
        if rank == 0:
            res["records"] = [r for r in _records(os.path.join(log_dir, name)) if "loss" in r]
        out[name] = res
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    w2 = run_dist(_train_all, 2, (str(tmp_path_factory.mktemp("w2")), list(RUNS)), timeout_s=300)
    w1 = _train_all(0, 1, str(tmp_path_factory.mktemp("w1")), COMPARED)
    return w1, w2


def _losses(res):
    return torch.tensor([r["loss"] for r in res["records"]], dtype=torch.float64)


@pytest.mark.parametrize("name", list(RUNS))
def test_recipe_trains_three_steps_under_ep2(runs, name):
    _, w2 = runs
    recs = w2[0][name]["records"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert torch.isfinite(torch.tensor([r["loss"], r["aux_loss"], r["z_loss"], r["grad_norm"]])).all(), r
        assert 0 <= r["drop_frac"] < 1
    assert recs[-1]["loss"] < 6.0                        # byte-level LM starts near ln(256) = 5.55
    assert "val_loss" in recs[-1]


@pytest.mark.parametrize("name", COMPARED)
def test_deterministic_recipe_matches_world1_loss_curve(runs, name):
    w1, w2 = runs
    torch.testing.assert_close(_losses(w2[0][name]), _losses(w1[name]), rtol=2e-5, atol=0)
    a, b = w2[0][name]["records"], w1[name]["records"]
    assert [r["aux_loss"] for r in a] == pytest.approx([r["aux_loss"] for r in b], rel=1e-4, abs=1e-7)
    assert [r["drop_frac"] for r in a] == pytest.approx([r["drop_frac"] for r in b], abs=1e-9)


@pytest.mark.parametrize("name", [n for n in COMPARED if n != "peer"])
def test_deterministic_recipe_matches_world1_val_loss(runs, name):
    w1, w2 = runs
    assert w2[0][name]["records"][-1]["val_loss"] == pytest.approx(w1[name]["records"][-1]["val_loss"], rel=2e-5)


def test_capacity_bound_recipes_really_are_capacity_bound(runs):
    """expert_choice and reroute are compared WITH a capacity: make sure it binds.
    Expert choice: every expert takes exactly C = 1.0 * 2 * 64 / 8 = 16 tokens of each of the 4
    micro batches of a step (64 per step, summed over ranks). Reroute: capacity 1.0 drops a good
    share of the copies under the residual policy, and rerouting keeps most of them."""
    _, w2 = runs
    for r in w2[0]["expert_choice"]["records"]:
        for layer in range(2):
            assert r[f"moe.layer{layer}.kept"] == [64.0] * 8
    rr, res = w2[0]["reroute"]["records"], w2[0]["reroute_residual"]["records"]
    assert res[0]["drop_frac"] > 0.1
    for a, b in zip(rr, res):
        assert a["drop_frac"] < b["drop_frac"] / 4


def test_gshard_runs_are_reproducible_from_the_seed(runs):
    _, w2 = runs
    torch.testing.assert_close(_losses(w2[0]["gshard"]), _losses(w2[0]["gshard_again"]), rtol=0, atol=0)


def test_aux_free_biases_move_and_stay_in_sync_across_ranks_and_layouts(runs):
    """Trainer.update_router_biases after each optimizer step: b += gamma * sign(mean - load)
    with the GLOBAL batch's routed counts (the moe.layer<i>.routed metric of that step), the same
    on every rank and in every layout."""
    w1, w2 = runs
    gamma = 0.001
    for res in (w1["aux_free"], w2[0]["aux_free"]):
        for layer, bias in enumerate(res["bias"]):
            want = torch.zeros(8, dtype=torch.float64)
            for rec in res["records"]:
                load = torch.tensor(rec[f"moe.layer{layer}.routed"], dtype=torch.float64)
                assert float(load.sum()) == 8 * 32 * 2            # every token's 2 copies, global batch
                want += gamma * torch.sign(load.mean() - load)
            torch.testing.assert_close(bias.double(), want, rtol=0, atol=1e-7)
            assert bias.abs().sum() > 0
    ref = w1["aux_free"]["bias"]
    assert len(ref) == 2
    for rank_out in w2:
        for got, want in zip(rank_out["aux_free"]["bias"], ref):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_moepp_zero_computation_copies_stay_off_the_all_to_all(runs):
    """Rows the experts received (all ranks, all layers) = kept copies on FFN experts only."""
    _, w2 = runs
    rec = w2[0]["moepp"]["records"][-1]
    F_ = 8
    ffn_kept = sum(sum(rec[f"moe.layer{i}.kept"][:F_]) for i in range(2))
    zero_kept = sum(sum(rec[f"moe.layer{i}.kept"][F_:]) for i in range(2))
    assert len(rec["moe.layer0.kept"]) == F_ + 4
    assert zero_kept > 0
    assert sum(rec["ranks.recv_tokens"]) == pytest.approx(ffn_kept)


def test_peer_val_loss_matches_world1(runs):
    w1, w2 = runs
    assert w2[0]["peer"]["records"][-1]["val_loss"] == pytest.approx(w1["peer"]["records"][-1]["val_loss"],
                                                                      rel=2e-5)
