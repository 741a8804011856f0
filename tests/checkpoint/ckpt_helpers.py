"""Shared pieces of the checkpoint tests: a tiny config, a training body for run_dist (world > 1)
and in-process use (world 1), losses read back from metrics.jsonl, and a CLI runner."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from moetrain.config import load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.loop import build_trainer, run_training

REPO = Path(__file__).resolve().parents[2]
FAULTY_MAIN = str(Path(__file__).resolve().parent / "_faulty_main.py")   # the CLI with a fault hook

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null", "moe.aux_loss_coef=0.01",
        "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=0", "train.eval_batches=1",
        "train.progress=false", "train.num_threads=1", "logging.every=1", "logging.tensorboard=false",
        "train.device=cpu"]     # CLI runs too: `auto` would take a GPU where there is one

# Exercises everything exact continuation needs beyond weights: a router buffer updated every step
# (aux-free bias) and the global torch RNG (router jitter), restored per rank.
STATEFUL = ["moe.router=aux_free", "moe.router_jitter=0.1"]

# the shared runs of conftest.py
W2_EXTRA = ["parallel.ep=2", "train.steps=20", "checkpoint.every=5", "checkpoint.keep_last=10"] + STATEFUL
W4_EXTRA = ["parallel.ep=4", "train.steps=10", "checkpoint.every=5"]


def overrides(log_dir, ckpt_dir, extra=()) -> list[str]:
    return TINY + [f"logging.dir={log_dir}", f"checkpoint.dir={ckpt_dir}"] + list(extra)


def make_cfg(log_dir, ckpt_dir, extra=()):
    return load_config(str(REPO / "configs/tiny_cpu.yaml"), overrides(log_dir, ckpt_dir, extra))


def losses(log_dir, run_name: str = "tiny") -> dict[int, float]:
    """step -> loss; a step logged twice (a run that resumed after a crash) keeps the last record."""
    out = {}
    with open(os.path.join(log_dir, run_name, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def parallel_for(cfg, rank: int, world: int):
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    return init_parallel(dp, tp, ep, env, "cpu")


def seed_process() -> None:
    """In-process (world 1) runs share the pytest process's RNGs: start each from a fixed state,
    as a fresh process would."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def train(rank: int, world: int, log_dir: str, ckpt_dir: str, extra=()) -> dict:
    """Body for run_dist (or a direct call at world 1): train, return rank 0's losses."""
    cfg = make_cfg(log_dir, ckpt_dir, extra)
    par = parallel_for(cfg, rank, world)
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    if world == 1:
        seed_process()
    run_training(cfg, par, data, log=lambda m: None)
    return losses(log_dir) if rank == 0 else None


def try_resume(rank: int, world: int, ckpt_dir: str, resume: str, extra=()) -> str:
    """Body for run_dist: build a trainer and apply checkpoint.resume; return the error line."""
    from moetrain.checkpoint import Checkpointer, CheckpointError
    cfg = make_cfg("unused", ckpt_dir, list(extra) + [f"checkpoint.resume={resume}"])
    par = parallel_for(cfg, rank, world)
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    trainer = build_trainer(cfg, par, data)
    try:
        Checkpointer(cfg, par, log=lambda m: None).resume(trainer)
    except CheckpointError as exc:
        return str(exc)
    return f"loaded step {trainer.state.step}"


def bad_then_train(rank: int, world: int, log_dir: str, ckpt_dir: str, bad: str, extra=()):
    """Body for run_dist: first a damaged checkpoint (every rank must get the same error, nobody
    may hang), then a normal training run in the same processes."""
    error = try_resume(rank, world, ckpt_dir, bad, extra)
    return error, train(rank, world, log_dir, ckpt_dir, extra)


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_"))}
    env.update(PYTHONUNBUFFERED="1", MOETRAIN_DIST_TIMEOUT="60", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def start_cli(args: list[str], env: dict | None = None, fault: tuple = ()) -> subprocess.Popen:
    """The CLI; with fault=("--kill"|"--crash", SPEC) the CLI with that fault (_faulty_main.py)."""
    entry = [FAULTY_MAIN, *fault] if fault else ["-m", "moetrain.train"]
    return subprocess.Popen([sys.executable, *entry, "--config", "configs/tiny_cpu.yaml", *args],
                            cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run_many(procs: list[subprocess.Popen], timeout_s: float = 120) -> list[tuple[int, str, str]]:
    """Wait for CLI processes started in parallel (the box has few cores; startup dominates)."""
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            so, se = p.communicate()
            raise AssertionError(f"CLI run did not finish within {timeout_s}s (hang?): {se[-2000:]}")
        out.append((p.returncode, so, se))
    return out
