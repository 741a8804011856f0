"""AdamW with weight decay on matrices only (norm gains are not decayed)."""
from __future__ import annotations

import torch
import torch.nn as nn

from moetrain.config import TrainConfig
from moetrain.train.lazy_adam import LazyAdamW


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no_decay] parameter groups: weight decay on matrices only (norm gains are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig, lazy: bool = False) -> torch.optim.Optimizer:
    """AdamW; lazy (moe.peer.sparse_updates): LazyAdamW, the same for dense gradients and a
    row-wise lazy update for sparse ones (train/lazy_adam.py)."""
    groups = decay_groups(model, t.weight_decay)
    # CPU: foreach=False, per-tensor math, so expert shards update exactly like the same slices
    # of the unsharded stack (the cross-layout property; the CPU foreach path is no faster).
    # CUDA: the multi-tensor (foreach) kernels, a few launches instead of ~10 per parameter; their
    # math is elementwise, so a shard still updates like its slice of the whole tensor.
    cuda = any(p.device.type == "cuda" for g in groups for p in g["params"])
    cls = LazyAdamW if lazy else torch.optim.AdamW
    return cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=cuda)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
