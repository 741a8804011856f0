"""GPU stats through NVML name the GPU this rank actually uses: by UUID, because NVML numbers
every GPU of the node and ignores CUDA_VISIBLE_DEVICES (cuda:0 of a rank bound to the node's
fourth GPU is NVML index 3). NVML and CUDA are faked; the real thing runs in tools/gpu_check.sh."""
from __future__ import annotations

import sys
import types

import torch

from moetrain.metrics import GpuStats, nvml_uuid


def test_nvml_uuid_format():
    assert nvml_uuid("5c6a1b2e-0000-1111-2222-333344445555") == "GPU-5c6a1b2e-0000-1111-2222-333344445555"
    assert nvml_uuid("GPU-abc") == "GPU-abc" and nvml_uuid("MIG-abc") == "MIG-abc"


def test_handle_is_looked_up_by_the_cuda_devices_uuid(monkeypatch):
    calls = {}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: calls.setdefault("by_index", i),
        nvmlDeviceGetHandleByUUID=lambda u: calls.setdefault("by_uuid", u) and "handle",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=57),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2 ** 30),
        nvmlDeviceGetPowerUsage=lambda h: 250_000,
        nvmlDeviceGetTemperature=lambda h, kind: 61,
        NVML_TEMPERATURE_GPU=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # this process sees one GPU (CUDA_VISIBLE_DEVICES=3): cuda:0, whose UUID is the node's 4th GPU's
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="uuid-of-gpu-3"))
    stats = GpuStats(torch.device("cuda", 0))
    assert stats.reason is None
    assert calls == {"by_uuid": "GPU-uuid-of-gpu-3"}
    assert stats.read() == {"gpu.util_pct": 57.0, "gpu.mem_used_gb": 3.0, "gpu.power_w": 250.0, "gpu.temp_c": 61.0}


def test_cpu_runs_say_why_there_are_no_gpu_stats():
    stats = GpuStats(torch.device("cpu"))
    assert stats.read() == {} and "no NVIDIA GPU in use" in stats.reason
