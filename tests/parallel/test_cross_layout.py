"""The central property (DESIGN.md): with capacity_factor null, the loss curve and the gradients
of every (dp, ep) layout equal world size 1 on the same global batches."""
import json
import os

import pytest
import torch

from _dist import run_dist
from moetrain.config import load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.loop import build_trainer, run_training
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null", "moe.aux_loss_coef=0.01",
        "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=5",
        "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=0", "train.eval_batches=1",
        "train.progress=false", "logging.every=1", "logging.tensorboard=false"]


def _cfg(log_dir, extra=()):
    return load_config("configs/tiny_cpu.yaml", TINY + [f"logging.dir={log_dir}"] + list(extra))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["loss"] for r in recs if "loss" in r]


def _train(rank, world, log_dir, extra):
    cfg = _cfg(log_dir, extra)
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = init_parallel(dp, tp, ep, env, "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    run_training(cfg, par, data, log=lambda m: None)
    return _losses(os.path.join(log_dir, cfg.logging.run_name)) if rank == 0 else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    return _train(0, 1, str(tmp_path_factory.mktemp("w1")), [])


@pytest.mark.parametrize("world,extra", [
    (2, ["parallel.ep=2"]),
    (4, ["parallel.ep=4"]),
    (4, ["parallel.ep=2"]),          # dp=4, ep=2: expert grads also summed over edp
    (2, ["parallel.ep=1"]),          # plain data parallel, experts replicated
])
def test_loss_curve_matches_world1(reference, tmp_path, world, extra):
    losses = run_dist(_train, world, (str(tmp_path), extra))[0]
    assert len(losses) == len(reference) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-5, atol=0)


def test_micro_batch_capped_at_per_rank_batch_matches_world1(tmp_path):
    """A config written for world 1 (micro 8 = the whole global batch of 8) runs at world 4
    with the micro batch capped at 8/4 = 2 and trains the same curve (balance loss off: it is
    computed per micro batch, so its value depends on the micro batch by definition)."""
    extra = ["train.micro_batch_size=8", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"]
    torch.set_num_threads(1)
    want = _train(0, 1, str(tmp_path / "w1"), extra)
    got = run_dist(_train, 4, (str(tmp_path / "w4"), extra + ["parallel.ep=4"]))[0]
    assert len(got) == len(want) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-5, atol=0)


def _grads(rank, world, ep):
    extra = [f"parallel.ep={ep}"]
    cfg = _cfg("unused", extra)
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = init_parallel(dp, tp, ep, env, "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    trainer = build_trainer(cfg, par, data)
    trainer.compute_gradients(step=0)
    out = {}
    for name, mod in trainer.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{name}.{pname}"
            offset = getattr(mod, "expert_offset", None)
            out[key] = (offset, p.grad.clone())
    return out


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_gradients_match_world1(world, ep):
    """Dense and expert gradients after sync equal world 1's, not 1/ep or 1/dp of them."""
    torch.set_num_threads(1)
    ref = _grads(0, 1, 1)
    per_rank = run_dist(_grads, world, (ep,))
    for rank_out in per_rank:
        for key, (offset, g) in rank_out.items():
            want = ref[key][1]
            if offset is not None:
                want = want[offset:offset + g.shape[0]]
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7, msg=key)
