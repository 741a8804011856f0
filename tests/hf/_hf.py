"""Shared pieces of the Hugging Face export/import tests (tools/export_hf.py, tools/import_hf.py)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from _tools import load_tool
from moetrain import growth
from moetrain.checkpoint.convert import read_checkpoint, write_sharded
from moetrain.config import load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.loop import run_training

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
# tiny shapes for every recipe (configs/*.yaml keep their routing keys); 4 heads of 8: the RoPE
# permutation inside a head is exercised
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.ffn_hidden=64",
        "model.init_std=0.1", "moe.expert_hidden=32", "train.seq_len=32", "train.device=cpu"]
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=1", "train.lr=3e-3",
         "train.eval_every=0", "train.eval_batches=2", "train.progress=false", "train.num_threads=1",
         "logging.every=1", "logging.tensorboard=false", "train.device=cpu"]
TOL = 1e-4


tool = load_tool


def tokens(seed: int = 0, batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_state(cfg, seed: int = 3) -> dict:
    """A fresh init with norms (and aux-free biases) away from their init values, so a swapped
    or dropped tensor shows in the logits."""
    sd = growth.fresh_state(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if "norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("expert_bias"):
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
    if cfg.model.tie_embeddings:
        sd["head.weight"] = sd["embed.weight"]
    return sd


def write_ckpt(cfg, sd: dict, out) -> str:
    return write_sharded(growth.checkpoint_record(cfg, sd), str(out), "test")


def load_ckpt(path, overrides=()):
    """(cfg, eval model, state dict) of a moetrain checkpoint; overrides e.g. moe.capacity_factor=null."""
    _, full = read_checkpoint(str(path))
    cfg = growth.config_from_dict(full["manifest"]["config"], list(overrides))
    return cfg, growth.build_model(cfg, full["model"]), full["model"]


@torch.no_grad()
def our_logits(model, tok) -> torch.Tensor:
    return model(tok)[0].float()


@torch.no_grad()
def hf_logits(hf_model, tok) -> torch.Tensor:
    return hf_model(tok).logits.float()


def load_hf(path):
    """AutoModelForCausalLM.from_pretrained, fp32, eval; fails on any missing/unexpected/mismatched key."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, bad
    return model.eval()


def records(log_dir, run_name) -> list:
    with open(os.path.join(log_dir, run_name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(rank: int, world: int, config: str, extra: list):
    """Body for run_dist: train from `config` + extra; rank 0 returns its metrics records."""
    cfg = load_config(config, [*TRAIN, *extra])
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = init_parallel(dp, tp, ep, env, "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    if world == 1:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
    run_training(cfg, par, data, log=lambda m: None)
    return records(cfg.logging.dir, cfg.logging.run_name) if rank == 0 else None
