"""Numerics under bf16 autocast (CPU autocast stands in for CUDA's): router math in fp32 with
autocast off, expert payloads in the compute dtype, fp32 out of the layer; FSDP mixed-precision
choices; deterministic mode."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError, MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.router import Router
from moetrain.parallel.fsdp import fsdp_dtypes
from moetrain.precision import autocast_off, compute_dtype, uses_bf16_autocast

D, E = 32, 8


def _gate(kind="topk"):
    gate = Router(MoEConfig(num_experts=E, top_k=2, router=kind, capacity_factor=None, min_capacity=1), D)
    torch.manual_seed(0)
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
        if gate.noise_weight is not None:
            gate.noise_weight.normal_(0, 0.5)
    return gate


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "aux_free"])
def test_router_logits_are_fp32_under_bf16_autocast(kind):
    gate = _gate(kind).eval()
    x = torch.randn(64, D)
    want = F.linear(x, gate.weight)                      # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, gate.weight).dtype == torch.bfloat16       # what autocast would do
        out = gate(x, None, 1)
    assert out.logits_TE.dtype == torch.float32
    assert torch.equal(out.logits_TE, want)
    assert out.routing.weights_TK.dtype == torch.float32


def test_layer_sends_compute_dtype_and_returns_the_residual_dtype():
    layer = MoELayer(MoEConfig(num_experts=E, top_k=2, capacity_factor=None, grouped_mm="loop"), D, 16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    seen = {}
    layer.experts.register_forward_pre_hook(lambda m, args: seen.update(dtype=args[0].dtype))
    x = torch.randn(2, 8, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert seen["dtype"] == torch.bfloat16                 # the payload and the expert GEMMs
    assert y.dtype == torch.float32                        # the residual stream's dtype
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.experts.w1.grad.dtype == torch.float32    # fp32 master weights


def test_compute_dtype_and_autocast_off():
    x = torch.randn(2, 2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        with autocast_off("cpu"):
            assert compute_dtype(x) == torch.float32
    with autocast_off("meta"):            # no autocast on meta: a no-op context
        assert compute_dtype(x.to("meta")) == torch.float32


def test_fsdp_mixed_precision_choices():
    assert fsdp_dtypes("auto", "float32", True) == (torch.bfloat16, None)
    assert fsdp_dtypes("auto", "float32", False) == (None, None)
    assert fsdp_dtypes("float32", "bfloat16", False) == (None, torch.bfloat16)
    with pytest.raises(ConfigError, match="fsdp_param_dtype='bfloat16' is not allowed without bf16 autocast"):
        fsdp_dtypes("bfloat16", "float32", False)


def test_precision_setting():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert uses_bf16_autocast("auto", cuda) and not uses_bf16_autocast("auto", cpu)
    assert not uses_bf16_autocast("fp32", cuda) and uses_bf16_autocast("bf16", cpu)


def test_deterministic_mode_is_set_before_training():
    code = ("from moetrain.precision import configure_determinism; import os, torch; "
            "configure_determinism(True); "
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'], "
            "torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", ":4096:8", "True", "False"]
