"""The DeepSpeed engine (train.engine=deepspeed, train/ds_engine.py) against the native engine.

Oracle: the native engine at world 1 (which every native layout reproduces, test_cross_layout).
At world 2, ZeRO-1 and ZeRO-2 with ep=1 and ep=2 (and stage 0), 2 micro batches per rank
(gradient accumulation), must give the same loss and grad-norm curves to rtol 2e-5 (and a
PEER model under ZeRO-2 the native engine's at the same layout): DeepSpeed's
dp-averaging and accumulation scaling are undone exactly (loss * dp, scale_wrt_gas=False), its
expert params reduce over edp only (MoE param groups), and its ZeRO clip uses the global norm.
Skipped when deepspeed is not installed.
"""
from __future__ import annotations

import json
import os
from importlib.util import find_spec

import pytest
import torch

from _dist import run_dist
from _train import TINY_3D, run_training_keep_trainer
from moetrain.config import ConfigError, load_config, validate_layout

HAVE_DS = find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAVE_DS, reason="deepspeed is not installed (pip install -e '.[deepspeed]')")

TINY = TINY_3D
CONFIG = "configs/tiny_cpu.yaml"
DS = ["train.engine=deepspeed"]


def _env(rank, world):
    from moetrain.parallel.mesh import LaunchEnv
    return LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")


def _body(rank, world, root, cases):
    """Each case: a 5-step run (records on rank 0) and what the engine holds on this rank."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel

    out = {}
    data = None
    for name, extra in cases:
        cfg = load_config(CONFIG, TINY + extra + [f"logging.dir={root}", f"logging.run_name={name}"])
        dp, tp, ep = validate_layout(cfg, world)
        par = init_parallel(dp, tp, ep, _env(rank, world), "cpu")
        data = data or load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
        trainer = run_training_keep_trainer(cfg, par, data)
        info = {}
        if trainer.engine is not None:
            eng = trainer.engine.engine
            groups = trainer.opt.param_groups
            info = {"has_moe_layers": eng.has_moe_layers,
                    "moe_groups": sorted(g["name"] for g in groups if g.get("moe")),
                    "opt_state_numel": sum(v.numel() for st in trainer.opt.optimizer.state.values()
                                           for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
                    if cfg.train.zero_stage > 0 else None,
                    "param_numel": sum(p.numel() for p in trainer.model.parameters())}
        recs = None
        if rank == 0:            # rank 0 writes metrics.jsonl; another rank could read it half-written
            with open(os.path.join(root, name, "metrics.jsonl")) as f:
                recs = [r for r in map(json.loads, f) if "loss" in r]
        out[name] = {"records": recs, "info": info}
    return out


@pytest.fixture(scope="module")
def native_w1(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return _body(0, 1, str(tmp_path_factory.mktemp("native_w1")), [("native", [])])["native"]["records"]


W2 = [("zero1_ep1", DS + ["parallel.ep=1", "train.zero_stage=1"]),
      ("zero1_ep2", DS + ["parallel.ep=2", "train.zero_stage=1"]),
      ("zero2_ep2", DS + ["parallel.ep=2", "train.zero_stage=2"]),
      ("zero0_ep2", DS + ["parallel.ep=2", "train.zero_stage=0"])]
PEER = ["moe.layer=peer", "moe.peer.num_keys=8", "moe.peer.top_k=4", "moe.peer.key_dim=16"]
# PEER expert tables are expert params too; compared with the native engine at the same layout
W2_PEER = [("zero2_ep2_peer", DS + PEER + ["parallel.ep=2", "train.zero_stage=2"]),
           ("native_ep2_peer", PEER + ["parallel.ep=2"])]


@pytest.mark.slow
@needs_ds
def test_world2_deepspeed_matches_native(native_w1, tmp_path):
    torch.set_num_threads(1)
    per_rank = run_dist(_body, 2, (str(tmp_path), W2 + W2_PEER), timeout_s=300)
    want = native_w1
    assert len(want) == 5
    for name, extra in W2:
        got = per_rank[0][name]["records"]
        assert [r["step"] for r in got] == [r["step"] for r in want], name
        for key in ("loss", "grad_norm", "aux_loss"):
            torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                       rtol=2e-5, atol=0, msg=f"{name} {key}")
        for rank_out in per_rank:
            info = rank_out[name]["info"]
            assert info["has_moe_layers"] and info["moe_groups"], (name, info)
            if "zero_stage=0" not in " ".join(extra):
                # ZeRO partitions AdamW's two moments: dense over dp=2, experts over edp
                full = 2 * info["param_numel"]
                assert info["opt_state_numel"] < 0.75 * full, (name, info)
    got, want = (per_rank[0][name]["records"] for name, _ in W2_PEER)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=2e-5, atol=0, msg=f"PEER {key}")


def test_ds_config_is_generated_from_ours():
    from moetrain.train.ds_engine import ds_config
    cfg = load_config(CONFIG, TINY + ["train.global_batch_size=16", "train.zero_stage=2", "train.weight_decay=0.05"])
    c = ds_config(cfg, 2, torch.device("cpu"))
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 2, 4)
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 0.5
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["weight_decay"] == 0.05
    assert c["optimizer"]["params"]["betas"] == [cfg.train.beta1, cfg.train.beta2]
    # DeepSpeed's bf16 mode stays off on every device: fp32 weights, gradient accumulation and
    # reduction inside DeepSpeed, bf16 compute from the trainer's autocast
    assert not c["bf16"]["enabled"] and not ds_config(cfg, 2, torch.device("cuda"))["bf16"]["enabled"]
    # stage 0: DeepSpeed's clip would average per-rank norms; the engine clips with the global norm
    cfg0 = load_config(CONFIG, TINY + ["train.zero_stage=0"])
    assert ds_config(cfg0, 2, torch.device("cpu"))["gradient_clipping"] == 0.0


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.tp=2"], "parallel.tp=2 is not allowed: train.engine=deepspeed"),
    (["parallel.fsdp=true"], "parallel.fsdp=True is not allowed"),
    (["checkpoint.every=5"], "checkpoint.every=5 is not allowed: train.engine=deepspeed does not checkpoint"),
    (["checkpoint.resume=auto"], "checkpoint.resume='auto' is not allowed"),
    (["train.zero_stage=3"], "train.zero_stage=3 is not allowed: one of 0, 1, 2"),
])
def test_config_rejects_deepspeed_combinations(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, TINY + DS + overrides)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_config_without_deepspeed_installed(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    with pytest.raises(ConfigError, match=r"^train.engine='deepspeed' is not allowed: the deepspeed package is not "):
        load_config(CONFIG, TINY + DS)
    assert load_config(CONFIG, TINY).train.engine == "native"     # native never needs it


def test_deepspeed_version_outside_the_tested_range_is_one_line(monkeypatch):
    """train.engine=deepspeed needs the 0.19 line it is tested with (0.19.8 on)."""
    import importlib.metadata as md

    from moetrain.config import ConfigError
    if not HAVE_DS:
        pytest.skip("deepspeed is not installed")
    for bad in ("0.15.4", "0.20.0", "0.19.7"):
        monkeypatch.setattr(md, "version", lambda name, v=bad: v)
        with pytest.raises(ConfigError, match=f"found deepspeed {bad}, but train.engine=deepspeed is tested with 0.19.8"):
            load_config(CONFIG, TINY + ["train.engine=deepspeed"])
    monkeypatch.setattr(md, "version", lambda name: "0.19.9")
    load_config(CONFIG, TINY + ["train.engine=deepspeed"])
