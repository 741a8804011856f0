"""Model growth (moetrain/growth.py, tools/upcycle.py, tools/depth_upscale.py, tools/ensemble_eval.py):
upcycled MoE == dense model at step 0 (top-1, top-2, sliced and fine-grained experts), the upcycled
checkpoint resumes at ep=2, depth up-scaling renumbers layers and trains on, ensembles beat their
members' mean, and refusals are one line with exit code 2."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _tools import load_tool
from _dist import run_dist

from moetrain import growth
from moetrain.checkpoint.convert import write_sharded
from moetrain.config import Config, load_config, validate_layout
from moetrain.data import eval_batches, load_token_data, sample_batch
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.loop import run_training

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
TINY = ["model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=0", "moe.capacity_factor=null", "train.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_batches=2",
        "train.progress=false", "train.num_threads=1", "logging.every=1", "logging.tensorboard=false"]


_tool = load_tool


def _records(log_dir, run_name):
    with open(os.path.join(log_dir, run_name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(rank: int, world: int, config: str | None, extra: list[str]):
    """Body for run_dist (or a direct call at world 1): train; rank 0 returns its metrics records."""
    cfg = load_config(config or str(REPO / "configs/tiny_cpu.yaml"), (TINY if config is None else []) + extra)
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = init_parallel(dp, tp, ep, env, "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    if world == 1:          # in-process: start from a fixed RNG state, as a fresh process would
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
    run_training(cfg, par, data, log=lambda m: None)
    return _records(cfg.logging.dir, cfg.logging.run_name) if rank == 0 else None


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A 4-layer dense run, 10 steps, checkpoints at 5 and 10, val loss at 10."""
    root = tmp_path_factory.mktemp("dense")
    recs = _train(0, 1, None, [f"logging.dir={root / 'runs'}", f"checkpoint.dir={root / 'ckpt'}", "train.steps=10",
                               "checkpoint.every=5", "checkpoint.keep_last=2", "train.eval_every=10"])
    val = next(r["val_loss"] for r in recs if r.get("step") == 10 and "val_loss" in r)
    return {"root": root, "ckpt": root / "ckpt", "val_loss": val}


def _load(path) -> tuple[Config, torch.nn.Module]:
    _, full = _tool("upcycle").read_checkpoint(str(path))
    cfg = growth.config_from_dict(full["manifest"]["config"])
    return cfg, growth.build_model(cfg, full["model"])


def _val_batches(cfg: Config):
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    return data, eval_batches(data.val, cfg.train.eval_batches, cfg.train.global_batch_size, cfg.train.seq_len)


UPCYCLE_CASES = {
    # name: (overrides, expected router init, expected w2 scale)
    "top2-copies": (["moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=64"], "grouped", 1.0),
    "top2-slices": (["moe.num_experts=8", "moe.top_k=2"], "grouped", 2.0),            # hidden 32 = 64 / top_k
    "top1": (["moe.num_experts=8", "moe.top_k=1"], "zero", 8.0),                       # raw prob 1/8
    "switch": (["moe.num_experts=4", "moe.top_k=1", "moe.router=switch"], "zero", 4.0),
    "top2-no-norm": (["moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=64", "moe.norm_topk_prob=false"],
                     "zero", 4.0),                                                     # 2 gates of 1/8
    "fine-grained": (["moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=64", "moe.expert_granularity=2"],
                     "grouped", 2.0),                                                  # K=4 of 8 halves
    "top2-slices-zero-router": (["moe.num_experts=8", "moe.top_k=2", "--router", "zero"], "zero", 2.0),
}


@pytest.mark.parametrize("case", list(UPCYCLE_CASES))
def test_upcycled_step0_equals_dense(dense, tmp_path, capsys, case):
    overrides, router, scale = UPCYCLE_CASES[case]
    out = tmp_path / "moe"
    assert _tool("upcycle").main([str(dense["ckpt"]), "--out", str(out), *overrides]) == 0
    assert f"router {router}" in capsys.readouterr().out
    dense_cfg, dense_model = _load(dense["ckpt"])
    _, moe_model = _load(out)
    manifest_up = json.loads((out / "step_00000000" / "manifest.json").read_text())["upcycled_from"]
    assert manifest_up["router"] == router and manifest_up["w2_scale"] == scale and manifest_up["exact"]
    assert len(moe_model.moe_layers()) == 4
    gate_ND = moe_model.moe_layers()[0].router.weight.detach()
    if router == "zero":
        assert not gate_ND.any()
    else:      # one random row per group of r slice experts: tokens spread over the groups
        r = manifest_up["slices"]
        assert len({tuple(row.tolist()) for row in gate_ND}) == gate_ND.shape[0] // r
        assert torch.equal(gate_ND, gate_ND[(torch.arange(gate_ND.shape[0]) // r) * r])
    _, batches = _val_batches(dense_cfg)
    with torch.no_grad():
        x = batches[0][:4, :-1]
        logits, auxes = moe_model(x)
        torch.testing.assert_close(logits, dense_model(x)[0], rtol=1e-5, atol=1e-5)
    if router == "grouped":     # whole groups taken (equal counts inside a group), different groups by token
        counts_LGR = torch.stack([aux.counts_E.view(-1, manifest_up["slices"]) for aux in auxes])
        assert (counts_LGR == counts_LGR[..., :1]).all()
        assert ((counts_LGR[..., 0] > 0).sum(1) >= 2).any()
    (loss_moe,), _ = growth.ensemble_losses([moe_model], batches, 4)
    # Trainer.evaluate's number for the dense run, on the same windows
    assert loss_moe == pytest.approx(dense["val_loss"], rel=1e-6, abs=0)


def test_upcycle_noise_is_relative_and_reproducible():
    gen = torch.Generator().manual_seed(0)
    w1, w3, w2 = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen), torch.randn(32, 64, generator=gen)
    plan = growth.UpcyclePlan(num_experts=4, top_k=2, slices=1, expert_hidden=64, router="grouped", w2_scale=1.0,
                              exact=True, noise=0.01, seed=7)
    a = growth.upcycle_ffn(w1, w3, w2, plan, "layers.0.ffn")
    b = growth.upcycle_ffn(w1, w3, w2, plan, "layers.0.ffn")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    rel = float((a[0][1] - w1.t()).std() / w1.std())
    assert 0.005 < rel < 0.02
    assert not torch.equal(a[0][0], a[0][1])               # experts differ from each other


def test_upcycle_refusals(dense, tmp_path, capsys):
    base = load_config(str(REPO / "configs/tiny_cpu.yaml"), TINY)

    def moe(*extra):
        return load_config(str(REPO / "configs/tiny_cpu.yaml"), TINY + list(extra))
    for extra, words in [(["moe.num_experts=8", "moe.router=expert_choice", "moe.capacity_factor=1.0"], "expert_choice"),
                         (["moe.num_experts=8", "moe.shared_experts=1"], "shared_experts"),
                         (["moe.num_experts=8", "moe.top_k=1", "moe.expert_hidden=32"], "cannot cover"),
                         (["moe.num_experts=8", "model.ffn_hidden=96"], "model.ffn_hidden"),
                         (["moe.num_experts=8", "moe.expert_hidden=48"], "must divide")]:
        with pytest.raises(growth.GrowthError, match=words):
            growth.plan_upcycle(base, moe(*extra))
    code = _tool("upcycle").main([str(dense["ckpt"]), "--out", str(tmp_path / "x"), "moe.num_experts=8",
                                  "moe.router=expert_choice", "moe.capacity_factor=1.0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "expert_choice" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_upcycled_checkpoint_resumes_at_ep2(dense, tmp_path):
    """World 2, ep 2: the step-0 val loss equals the dense model's, the first training loss equals
    the dense model's CE on batch 0, then it trains."""
    out = tmp_path / "moe"
    assert _tool("upcycle").main([str(dense["ckpt"]), "--out", str(out), "moe.num_experts=4", "moe.top_k=2"]) == 0
    recs = run_dist(_train, 2, (str(out / "upcycled.yaml"),
                                ["parallel.ep=2", "train.steps=3", "train.eval_every=3", "train.num_threads=1",
                                 f"logging.dir={tmp_path / 'runs'}"]))[0]
    val0 = next(r["init_val_loss"] for r in recs if r["step"] == 1)
    assert val0 == pytest.approx(dense["val_loss"], rel=1e-5, abs=0)
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    dense_cfg, dense_model = _load(dense["ckpt"])
    data = load_token_data(dense_cfg.data.source, dense_cfg.data.path, 256)
    batch0 = sample_batch(data.train, dense_cfg.train.seed, 0, dense_cfg.train.global_batch_size, dense_cfg.train.seq_len)
    (ce0,), _ = growth.ensemble_losses([dense_model], [batch0], 4)
    assert losses[1] == pytest.approx(ce0, rel=1e-5, abs=0)


def test_depth_upscale_renumbers_and_trains(dense, tmp_path, capsys):
    out = tmp_path / "deep"
    tool = _tool("depth_upscale")
    assert tool.main([str(dense["ckpt"]), "--drop", "1", "--out", str(out)]) == 0
    assert "6 layers = old [0, 1, 2] + old [1, 2, 3]" in capsys.readouterr().out
    _, src = _load(dense["ckpt"])
    cfg, deep = _load(out)
    assert cfg.model.n_layers == 6 and len(deep.layers) == 6
    sd, old = deep.state_dict(), src.state_dict()
    for new_i, old_i in enumerate([0, 1, 2, 1, 2, 3]):
        for name in ("attn.wo.weight", "ffn.w2.weight", "ffn_norm.weight"):
            assert torch.equal(sd[f"layers.{new_i}.{name}"], old[f"layers.{old_i}.{name}"])
    assert torch.equal(sd["head.weight"], old["head.weight"])
    recs = _train(0, 1, str(out / "upscaled.yaml"), ["train.steps=3", "train.eval_every=0",
                                                      f"logging.dir={tmp_path / 'runs'}"])
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # upscaled.yaml continues in --out (checkpoint.every=5 inherited from the dense run: final save)
    assert sorted(os.listdir(out)) == ["latest", "step_00000000", "step_00000003", "upscaled.yaml"]
    # refusals: --drop out of range; a drop that moves dense layers onto MoE positions
    assert tool.main([str(dense["ckpt"]), "--drop", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "--drop 4 must be in 0..3" in capsys.readouterr().err
    every3 = load_config(str(REPO / "configs/tiny_cpu.yaml"), TINY + ["moe.num_experts=4", "moe.every=3"])
    deeper = load_config(str(REPO / "configs/tiny_cpu.yaml"), TINY + ["moe.num_experts=4", "moe.every=3",
                                                                      "model.n_layers=6"])
    with pytest.raises(growth.GrowthError, match="multiple of moe.every"):   # new layer 5 (MoE) <- old 3 (dense)
        growth.check_depth_moe_pattern(every3, deeper, growth.depth_plan(4, 1))
    growth.check_depth_moe_pattern(every3, every3, growth.depth_plan(4, 2))   # n - 2m = 0: fine


def test_ensemble_beats_mean_of_members(dense):
    ckpts = sorted(p for p in os.listdir(dense["ckpt"]) if p.startswith("step_"))
    assert ckpts == ["step_00000005", "step_00000010"]
    res = _tool("ensemble_eval").evaluate([str(dense["ckpt"] / c) for c in ckpts], device="cpu")
    a, b = (r["val_loss"] for r in res["models"])
    assert b == pytest.approx(dense["val_loss"], rel=1e-6, abs=0)     # same windows as training's eval
    assert a != b and res["ensemble_val_loss"] <= (a + b) / 2


def test_ensemble_refuses_mismatched_vocab(dense, tmp_path, capsys):
    cfg = load_config(str(REPO / "configs/tiny_cpu.yaml"), TINY + ["model.vocab_size=300"])
    tool = _tool("ensemble_eval")
    write_sharded(growth.checkpoint_record(cfg, growth.fresh_state(cfg)), str(tmp_path / "v300"), "test")
    capsys.readouterr()
    assert tool.main([str(dense["ckpt"]), str(tmp_path / "v300")]) == 2     # the CLI's exit code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "different vocabularies" in lines[0] and "300" in lines[0], captured.err
    assert captured.out == ""
