"""train/loop.py's pieces, at world 1 in this process: run_training returns its Run (trainer and
last record); build_run -> run.step / run.steps -> run.finish compose to the same run; a failed
build releases what it took; a logged step's statistics accumulate on the training device."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from moetrain.checkpoint import CheckpointError
from moetrain.config import load_config
from moetrain.data import load_token_data
from moetrain.metrics import StepStats
from moetrain.parallel.mesh import LaunchEnv, Parallel, ParallelDims, init_parallel
from moetrain.train.loop import Run, Trainer, build_run, build_trainer, run_training

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16", "train.seq_len=16", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.steps=3", "train.warmup_steps=1", "train.eval_every=2",
        "train.eval_batches=1", "train.progress=false", "logging.every=1", "logging.tensorboard=false",
        "checkpoint.every=0", "train.device=cpu"]


def _setup(tmp_path, name, extra=()):
    cfg = load_config("configs/tiny_cpu.yaml", TINY + [f"logging.dir={tmp_path}", f"logging.run_name={name}",
                                                       f"checkpoint.dir={tmp_path / 'ckpt'}"] + list(extra))
    par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
    return cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)


def _records(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_run_training_returns_its_run(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run = run_training(*_setup(tmp_path, "a"), log=lambda m: None)
    assert isinstance(run, Run) and isinstance(run.trainer, Trainer)
    assert run.trainer.state.step == 3 and run.trainer.state.tokens_seen == 3 * 4 * 16
    recs = _records(tmp_path, "a")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert json.loads(json.dumps(run.last)) == recs[-1]           # the last record, as written
    assert "init_val_loss" in recs[0] and "val_loss" in recs[1] and "val_loss" in recs[2]
    assert run.writer is None and run.progress is None            # closed
    assert signal.getsignal(signal.SIGTERM) == before              # handlers restored


def test_pieces_compose_to_the_same_run(tmp_path):
    """Steps one by one, then the rest with run.steps(): the records equal run_training's."""
    lines = []
    with build_run(*_setup(tmp_path, "b"), log=lines.append) as run:
        assert run.trainer.state.step == 0 and run.writer is not None
        assert lines[0].startswith("moetrain: world 1 (dp 1, tp 1, ep 1) on cpu")
        run.step(0)
        assert run.trainer.state.step == 1 and run.last["step"] == 1
        assert run.steps() is run.last and run.last["step"] == 3
        run.finish()
    assert run.writer is None
    run_training(*_setup(tmp_path, "c"), log=lambda m: None)
    drop = ("tokens_per_s", "step_ms", "a2a_ms", "a2a_frac", "ranks.a2a_ms", "ranks.a2a_dispatch_ms",
            "ranks.a2a_combine_ms", "ranks.a2a_bwd_ms", "ranks.step_ms")           # wall-clock times
    same = [{k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path, "b")]
    assert same == [{k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path, "c")]
    assert [line.split()[:4] for line in lines if line.startswith("step ")][-1] == ["step", "3", "loss",
                                                                                   f"{run.last['loss']:.4f}"]


def test_failed_build_releases_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CheckpointError):
        build_run(*_setup(tmp_path, "d", [f"checkpoint.resume={tmp_path / 'nowhere'}"]), log=lambda m: None)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "d").exists()          # the run directory comes after the resume


def test_step_stats_stay_on_the_training_device():
    """A logged step's statistics on the meta device: any host sync or stray CPU tensor in their
    accumulation (every micro-step) or in packing the record would raise."""
    cfg = load_config("configs/tiny_cpu.yaml", TINY + ["moe.grouped_mm=grouped"])
    par = Parallel(ParallelDims(1, 1, 1), 0, torch.device("meta"))
    trainer = build_trainer(cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size))
    stats = StepStats(len(trainer.model.moe_layers()), cfg.num_router_outputs, par.device)
    trainer.compute_gradients(step=0, stats=stats)
    assert stats.micro_steps == 2 and stats.routed_LE.device.type == "meta"
    rec = stats.record(step_ms=1.0)
    assert rec.routed.shape == (1, 2, cfg.num_router_outputs) and rec.step_ms.device.type == "meta"
