"""Host syncs of a training step (DESIGN habit 10): none per MoE layer without expert
parallelism on the grouped-GEMM path GPUs take, exactly one (the split exchange) with it.

Two ways to see on a CPU what a GPU would wait for:
  - the meta device: tensors without data, so every op that needs a value on the host raises
    (item/float/bool, tolist, nonzero, boolean-mask indexing, bincount, .cpu()), and a CPU tensor
    mixed into device math raises as it would on CUDA. World 1 only (no collectives on meta).
  - moetrain.syncs.SyncCounter on CPU tensors: counts the sync-forcing aten ops by kind, at
    world 2 with expert parallelism over gloo.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_dist
from moetrain.config import load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.parallel.grads import clip_grad_norm
from moetrain.parallel.mesh import LaunchEnv, Parallel, ParallelDims, init_parallel
from moetrain.syncs import SyncCounter
from moetrain.train.loop import build_trainer

# dim and expert hidden multiples of 8: the grouped (torch._grouped_mm) path's alignment
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.ffn_hidden=64",
        "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=16", "train.seq_len=16",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0", "train.progress=false",
        "logging.tensorboard=false", "train.device=cpu"]


def _cfg(extra=()):
    return load_config("configs/tiny_cpu.yaml", TINY + list(extra))


def _data(cfg):
    return load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)


@pytest.mark.parametrize("extra", [
    [],                                                   # top-k, capacity 1.25: dropped copies masked
    ["moe.capacity_factor=null"],                         # dropless
    ["moe.router=switch", "moe.top_k=1", "moe.shared_experts=1"],
    ["moe.router=gshard"],
    ["moe.router=aux_free", "moe.capacity_factor=null"],
    ["moe.router=noisy_topk"],
    ["moe.router=expert_choice", "moe.capacity_factor=1.0"],
    ["moe.zero_experts.zero=1", "moe.zero_experts.copy=1", "moe.zero_experts.constant=1"],
    ["moe.aux_loss_scope=sequence"],
])
def test_world1_forward_backward_on_meta_has_no_host_sync(extra):
    """Every micro-step's forward and backward of a whole training step run on the meta device
    with the grouped GEMM: one host sync or one stray CPU tensor would raise."""
    cfg = _cfg(["moe.grouped_mm=grouped"] + extra)
    par = Parallel(ParallelDims(1, 1, 1), 0, torch.device("meta"))
    trainer = build_trainer(cfg, par, _data(cfg))
    sums = trainer.compute_gradients(step=0)
    assert sums.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainer.dense_params + trainer.expert_params)


def test_world1_cpu_step_counts():
    """The same step on CPU tensors, counted: 0 sync ops on the grouped path; the loop path (CPU's
    default) reads the counts once per MoE layer and micro-step; clipping reads the norm once per
    optimizer step (it decides whether the step is taken)."""
    for impl, per_layer in (("grouped", 0), ("loop", 1)):
        cfg = _cfg([f"moe.grouped_mm={impl}"])
        par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
        trainer = build_trainer(cfg, par, _data(cfg))
        micro_steps = cfg.train.global_batch_size // cfg.train.micro_batch_size
        with SyncCounter() as c:
            trainer.compute_gradients(step=0)
        assert c.total == per_layer * len(trainer.model.moe_layers()) * micro_steps, (impl, dict(c.by_op))
        t = cfg.train
        with SyncCounter() as c:     # (AdamW's own step counter lives on the host on CUDA too)
            clip_grad_norm(trainer.dense_params, trainer.expert_params, t.grad_clip, None, 1)
        assert dict(c.by_op) == {"item": 1}


def _ep_counts(rank, world, extra):
    cfg = _cfg(["parallel.ep=2"] + extra)
    dp, tp, ep = validate_layout(cfg, world)
    par = init_parallel(dp, tp, ep, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    trainer = build_trainer(cfg, par, _data(cfg))
    trainer.compute_gradients(step=0)            # warm up (lazy inits)
    with SyncCounter() as c:
        trainer.compute_gradients(step=1)
    micro_steps = cfg.train.global_batch_size // world // cfg.train.micro_batch_size
    return dict(c.by_op), len(trainer.model.moe_layers()) * micro_steps


@pytest.mark.parametrize("extra", [[], ["moe.grouped_mm=grouped", "moe.capacity_factor=null"],
                                   ["moe.shared_experts=1"]])
def test_ep2_one_host_sync_per_moe_layer_and_micro_step(extra):
    """With expert parallelism the only sync is the count exchange's copy to the host."""
    for by_op, expected in run_dist(_ep_counts, 2, (extra,)):
        assert by_op == {"to_host": expected}, by_op


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=null", "moe.shared_experts=1"]])
def test_world1_cuda_step_has_no_host_sync(extra):
    """On a real GPU: CUDA's own sync detector (set_sync_debug_mode) raises on any synchronizing
    call during a whole step's forward and backward (bf16 autocast, grouped GEMM on sm90+; older
    GPUs take the loop path, which reads the counts once per MoE layer and micro-step)."""
    from moetrain.moe.experts import choose_impl
    cfg = _cfg(["train.device=cuda"] + extra)
    par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cuda")
    trainer = build_trainer(cfg, par, _data(cfg))
    trainer.compute_gradients(step=0)            # warm-up: allocator, cuBLAS handles, lazy inits
    torch.cuda.synchronize()
    impl = choose_impl("auto", par.device, torch.bfloat16, cfg.model.dim, cfg.expert_hidden)[0]
    if impl == "grouped":
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.compute_gradients(step=1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        with SyncCounter() as c:
            trainer.compute_gradients(step=1)
        micro_steps = cfg.train.global_batch_size // cfg.train.micro_batch_size
        assert dict(c.by_op) == {"to_host": len(trainer.model.moe_layers()) * micro_steps}
