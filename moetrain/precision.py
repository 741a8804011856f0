"""Numerics: which dtype a computation runs in, whatever device it is on, and deterministic mode.

Training on CUDA runs under bf16 autocast with fp32 master weights and an fp32 residual stream
(train/loop.Trainer.autocast); on CPU nothing is autocast. Modules that write into preallocated
buffers or call kernels autocast does not cover (the grouped expert GEMMs, the all-to-all
payload) ask `compute_dtype` what autocast would have used; routing math asks `autocast_off`
to stay in fp32.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_active(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def uses_bf16_autocast(precision: str, device: torch.device) -> bool:
    """train.precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 / fp32 force either
    (fp32 on a GPU: the layout-equality checks; bf16 on a CPU: CPU autocast, slow)."""
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul of x in: the autocast dtype when autocast is on
    for x's device, else x's own dtype."""
    if autocast_active(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_off(device_type: str):
    """A context with autocast disabled on this device type (a no-op where autocast does not
    exist, e.g. the meta device tests run the model on)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def configure_determinism(enabled: bool) -> None:
    """train.deterministic: deterministic algorithms everywhere (index_add_/scatter_add_ on CUDA
    switch to sorted, ordered implementations; an op without one raises instead of silently
    varying), cuDNN's deterministic kernels, and the cuBLAS workspace setting that
    deterministic GEMMs need. Call before the first CUDA operation (the cuBLAS setting is read
    when its handle is created). CPU kernels are deterministic either way."""
    if not enabled:
        return
    import os
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
