"""Run-directory writers (metrics.jsonl + TensorBoard) and per-step MoE statistics.

Every rank accumulates its own MoE statistics over the micro-steps of a step (`StepStats`); at a
logged step all ranks join ONE all_gather of a flat float tensor (`gather_stats`), and rank 0
turns it into the documented keys (`summarize`). Keys are documented in README.md ("Metrics").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

A2A_PHASES = ("counts", "dispatch", "combine", "dispatch_bwd", "combine_bwd")


@dataclass
class StepStats:
    """Sums over the micro-steps of one optimizer step, on one rank."""
    num_layers: int
    num_experts: int
    routed_LE: torch.Tensor = None
    kept_LE: torch.Tensor = None
    entropy_L: torch.Tensor = None
    recv_L: torch.Tensor = None
    a2a_ms: dict = field(default_factory=dict)
    a2a_bytes: float = 0.0
    micro_steps: int = 0

    def __post_init__(self):
        self.routed_LE = torch.zeros(self.num_layers, max(1, self.num_experts))
        self.kept_LE = torch.zeros_like(self.routed_LE)
        self.entropy_L = torch.zeros(self.num_layers)
        self.recv_L = torch.zeros(self.num_layers)

    def add(self, auxes) -> None:
        """Call after backward (timers hold backward all-to-all records by then)."""
        self.micro_steps += 1
        for i, aux in enumerate(auxes):
            self.routed_LE[i] += aux.counts_E.float().cpu()
            self.kept_LE[i] += aux.kept_E.float().cpu()
            self.entropy_L[i] += float(aux.entropy)
            self.recv_L[i] += aux.recv_tokens
            for phase, (ms, nbytes) in aux.timer.totals().items():
                self.a2a_ms[phase] = self.a2a_ms.get(phase, 0.0) + ms
                if phase in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"):
                    self.a2a_bytes += nbytes

    def flat(self, step_ms: float) -> torch.Tensor:
        head = [step_ms, self.a2a_bytes, float(self.micro_steps)] + [self.a2a_ms.get(p, 0.0) for p in A2A_PHASES]
        return torch.cat([torch.tensor(head), self.routed_LE.flatten(), self.kept_LE.flatten(),
                          self.entropy_L, self.recv_L])


def gather_stats(stats: StepStats, step_ms: float, group, world: int) -> Optional[torch.Tensor]:
    """All ranks call this together; returns [world, F] on every rank (world 1: no collective)."""
    flat = stats.flat(step_ms)
    if world == 1:
        return flat[None]
    out = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(out, flat, group=group)
    return torch.stack(out)


def summarize(rows: torch.Tensor, num_layers: int, num_experts: int, tp: int = 1) -> dict:
    """[world, F] gathered stats -> the documented metric keys (JSON-serializable)."""
    W = rows.shape[0]
    head = 3 + len(A2A_PHASES)
    L, E = num_layers, max(1, num_experts)
    step_ms = rows[:, 0]
    a2a_bytes = rows[:, 1]
    micro = rows[:, 2].clamp_min(1)
    phase_ms = {p: rows[:, 3 + i] for i, p in enumerate(A2A_PHASES)}
    o = head
    routed = rows[:, o:o + L * E].view(W, L, E); o += L * E
    kept = rows[:, o:o + L * E].view(W, L, E); o += L * E
    entropy = rows[:, o:o + L].view(W, L); o += L
    recv = rows[:, o:o + L].view(W, L)

    a2a_rank = sum(phase_ms.values())
    out: dict = {
        "a2a_ms": float(a2a_rank.mean()),
        "a2a_frac": float((a2a_rank / step_ms.clamp_min(1e-9)).mean()),
        "ranks.a2a_ms": _r(a2a_rank),
        "ranks.a2a_dispatch_ms": _r(phase_ms["dispatch"] + phase_ms["counts"]),
        "ranks.a2a_combine_ms": _r(phase_ms["combine"]),
        "ranks.a2a_bwd_ms": _r(phase_ms["dispatch_bwd"] + phase_ms["combine_bwd"]),
        "ranks.a2a_mb": _r(a2a_bytes / 2 ** 20),
        "ranks.step_ms": _r(step_ms),
    }
    if L == 0 or num_experts == 0:
        out["drop_frac"] = 0.0
        return out
    routed_LE = routed.sum(0) / tp     # TP ranks route the same tokens: count them once
    kept_LE = kept.sum(0) / tp
    recv_WL = recv / tp
    total_routed = float(routed_LE.sum())
    out["drop_frac"] = 1.0 - float(kept_LE.sum()) / total_routed if total_routed > 0 else 0.0
    recv_W = recv_WL.sum(1)
    out["ranks.recv_tokens"] = _r(recv_W)
    out["rank_imbalance"] = _imbalance(recv_W)
    for layer in range(L):
        r, k = routed_LE[layer], kept_LE[layer]
        pre = f"moe.layer{layer}"
        out[f"{pre}.routed"] = _r(r)
        out[f"{pre}.kept"] = _r(k)
        out[f"{pre}.drop_frac"] = 1.0 - float(k.sum()) / max(1.0, float(r.sum()))
        out[f"{pre}.expert_imbalance"] = _imbalance(r)
        out[f"{pre}.load_cv"] = float(r.std(unbiased=False) / r.mean().clamp_min(1e-9))
        out[f"{pre}.entropy"] = float((entropy[:, layer] / micro).mean())
        out[f"{pre}.recv_tokens"] = _r(recv_WL[:, layer])
    out["expert_imbalance"] = max(out[f"moe.layer{i}.expert_imbalance"] for i in range(L))
    return out


def _r(t: torch.Tensor) -> list:
    return [round(float(v), 4) for v in t]


def _imbalance(x: torch.Tensor) -> float:
    """max / mean (1.0 = perfectly balanced)."""
    m = float(x.float().mean())
    return float(x.max()) / m if m > 0 else 1.0


class RunWriter:
    """metrics.jsonl + tb/ under the run directory. Only rank 0 creates one."""

    def __init__(self, run_dir: str, tensorboard: bool):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, record: dict) -> None:
        clean = {k: _json_safe(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self.write_tensorboard(record)

    def write_tensorboard(self, record: dict) -> None:
        """TensorBoard only (e.g. the step-0 evaluation, which is no metrics.jsonl record)."""
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k == "step":
                    continue
                tag = k.replace(".", "/")
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(tag, v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    self._tb.add_scalars(tag, {str(i): float(x) for i, x in enumerate(v)}, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class GpuStats:
    """Utilization, memory, power, temperature through nvidia-ml-py, when NVIDIA GPUs exist."""

    def __init__(self, device: torch.device):
        self.handle = None
        self.reason = None
        if device.type != "cuda":
            self.reason = "GPU stats off: no NVIDIA GPU in use (train.device=cpu or none present)"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as exc:  # missing package or driver
            self.reason = f"GPU stats disabled: nvidia-ml-py unavailable ({type(exc).__name__})"

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n = self._nvml
        try:
            util = n.nvmlDeviceGetUtilizationRates(self.handle)
            mem = n.nvmlDeviceGetMemoryInfo(self.handle)
            return {"gpu.util_pct": float(util.gpu), "gpu.mem_used_gb": mem.used / 2 ** 30,
                    "gpu.power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                    "gpu.temp_c": float(n.nvmlDeviceGetTemperature(self.handle, n.NVML_TEMPERATURE_GPU))}
        except Exception:
            return {}
