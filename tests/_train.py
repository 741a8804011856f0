"""Shared pieces of the multi-rank training tests (tp, fsdp, deepspeed)."""
from __future__ import annotations

# a 2-layer model with one dense layer (0) and one MoE layer with a shared expert (1): every
# parameter kind (dense, TP shard, expert, shared expert) appears
TINY_3D = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
           "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=null", "moe.aux_loss_coef=0.01",
           "moe.every=2", "moe.shared_experts=1",
           "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=5",
           "train.warmup_steps=2", "train.lr=3e-3", "train.grad_clip=0.5", "train.eval_every=0",
           "train.eval_batches=1", "train.progress=false", "logging.every=1", "logging.tensorboard=false",
           "checkpoint.every=0"]


def run_training_keep_trainer(cfg, par, data):
    """moetrain.train.loop.run_training, returning the Trainer it built (to inspect the model)."""
    from moetrain.train.loop import run_training
    return run_training(cfg, par, data, log=lambda m: None).trainer
