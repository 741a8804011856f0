"""Run-directory writers (metrics.jsonl + TensorBoard) and per-step MoE statistics.

Every rank accumulates its own MoE statistics over the micro-steps of a step (`StepStats`); at a
logged step all ranks join ONE all_gather of their `StepRecord`s (`StepRecord.gather`), and rank 0
turns the gathered record into the documented keys (`summarize`; README.md "Metrics").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
import torch
import torch.distributed as dist

A2A_PHASES = ("counts", "dispatch", "combine", "dispatch_bwd", "combine_bwd")


@dataclass
class StepRecord:
    """One optimizer step's statistics by name. Every field is a float64 tensor whose first dim
    is the rank: [1, ...] on the training device for one rank (StepStats.record), [W, ...] on the
    host once gathered (StepRecord.gather). L MoE layers, E router outputs, P = len(A2A_PHASES)."""
    step_ms: torch.Tensor       # [W] wall time of the step
    a2a_bytes: torch.Tensor     # [W] moved by the dispatch/combine all-to-alls and their backward
    micro_steps: torch.Tensor   # [W]
    a2a_ms: torch.Tensor        # [W, P] all-to-all time per phase
    routed: torch.Tensor        # [W, L, E] copies this rank's tokens routed to each expert
    kept: torch.Tensor          # [W, L, E] ... of them kept (within capacity)
    entropy: torch.Tensor       # [W, L] router entropy, summed over micro-steps
    recv: torch.Tensor          # [W, L] rows this rank's experts processed

    def gather(self, group, world: int) -> StepRecord:
        """All ranks call this together: the fields travel packed in ONE all_gather on their
        device (as NCCL requires) and come back split by name, on the host (world 1: no collective)."""
        parts = [getattr(self, f.name) for f in fields(self)]
        flat = torch.cat([p.flatten() for p in parts])
        out = [flat]
        if world > 1:
            out = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(out, flat, group=group)
        rows = torch.stack(out).cpu().split([p.numel() for p in parts], dim=1)
        return StepRecord(*(r.reshape(world, *p.shape[1:]) for r, p in zip(rows, parts)))


class StepStats:
    """Sums over the micro-steps of one optimizer step, on one rank. The routing sums stay on
    the training device (no host sync per micro-step); the all-to-all timers are kept and
    resolved once, when the step is logged."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device = torch.device("cpu")):
        self.device = device
        # float64: exact integer counts far beyond fp32's 2**24
        self.routed_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.kept_LE = torch.zeros_like(self.routed_LE)
        self.entropy_L = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.recv_L = torch.zeros_like(self.entropy_L)
        self.timers: list = []
        self.micro_steps = 0

    def add(self, auxes) -> None:
        """Call after backward (timers hold backward all-to-all records by then)."""
        self.micro_steps += 1
        if not auxes:
            return
        self.routed_LE += torch.stack([a.counts_E for a in auxes]).to(self.routed_LE)
        self.kept_LE += torch.stack([a.kept_E for a in auxes]).to(self.kept_LE)
        self.entropy_L += torch.stack([a.entropy.detach() for a in auxes]).to(self.entropy_L)
        self.recv_L += torch.stack([a.recv_tokens for a in auxes]).to(self.recv_L)
        self.timers += [a.timer for a in auxes]

    def a2a_totals(self) -> tuple[dict, float]:
        """(phase -> ms, bytes moved by the dispatch/combine all-to-alls and their backward)."""
        ms: dict = {}
        nbytes = 0.0
        for timer in self.timers:
            for phase, (t, b) in timer.totals().items():
                ms[phase] = ms.get(phase, 0.0) + t
                if phase in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"):
                    nbytes += b
        return ms, nbytes

    def record(self, step_ms: float) -> StepRecord:
        """This rank's record on the training device; the host-side numbers (step time, resolved
        timers) go over in one small copy."""
        a2a_ms, a2a_bytes = self.a2a_totals()
        host = [step_ms, a2a_bytes, float(self.micro_steps)] + [a2a_ms.get(p, 0.0) for p in A2A_PHASES]
        h = torch.tensor([host], dtype=torch.float64, device=self.device)
        return StepRecord(h[:, 0], h[:, 1], h[:, 2], h[:, 3:], self.routed_LE[None], self.kept_LE[None],
                          self.entropy_L[None], self.recv_L[None])


def summarize(rec: StepRecord, tp: int = 1) -> dict:
    """Gathered stats -> the documented metric keys (JSON-serializable)."""
    _, L, E = rec.routed.shape
    phase_ms = dict(zip(A2A_PHASES, rec.a2a_ms.unbind(1)))
    a2a_rank = sum(phase_ms.values())
    out: dict = {
        "a2a_ms": float(a2a_rank.mean()),
        "a2a_frac": float((a2a_rank / rec.step_ms.clamp_min(1e-9)).mean()),
        "ranks.a2a_ms": _r(a2a_rank),
        "ranks.a2a_dispatch_ms": _r(phase_ms["dispatch"] + phase_ms["counts"]),
        "ranks.a2a_combine_ms": _r(phase_ms["combine"]),
        "ranks.a2a_bwd_ms": _r(phase_ms["dispatch_bwd"] + phase_ms["combine_bwd"]),
        "ranks.a2a_mb": _r(rec.a2a_bytes / 2 ** 20),
        "ranks.step_ms": _r(rec.step_ms),
    }
    if L == 0 or E == 0:
        out["drop_frac"] = 0.0
        return out
    routed_LE = rec.routed.sum(0) / tp     # TP ranks route the same tokens: count them once
    kept_LE = rec.kept.sum(0) / tp
    recv_WL = rec.recv / tp
    total_routed = float(routed_LE.sum())
    out["drop_frac"] = 1.0 - float(kept_LE.sum()) / total_routed if total_routed > 0 else 0.0
    recv_W = recv_WL.sum(1)
    out["ranks.recv_tokens"] = _r(recv_W)
    out["rank_imbalance"] = _imbalance(recv_W)
    micro = rec.micro_steps.clamp_min(1)
    for layer in range(L):
        r, k = routed_LE[layer], kept_LE[layer]
        pre = f"moe.layer{layer}"
        out[f"{pre}.routed"] = _r(r)
        out[f"{pre}.kept"] = _r(k)
        out[f"{pre}.drop_frac"] = 1.0 - float(k.sum()) / max(1.0, float(r.sum()))
        out[f"{pre}.expert_imbalance"] = _imbalance(r)
        out[f"{pre}.load_cv"] = float(r.std(unbiased=False) / r.mean().clamp_min(1e-9))
        out[f"{pre}.entropy"] = float((rec.entropy[:, layer] / micro).mean())
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
                elif isinstance(v, list) and v and all(isinstance(x, list) for x in v):
                    # e.g. placement.layer0.experts_per_rank: one line per rank, as text
                    self._tb.add_text(tag, "  \n".join(f"rank {i}: {x}" for i, x in enumerate(v)), step)

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
            # by UUID: NVML numbers all GPUs of the node and ignores CUDA_VISIBLE_DEVICES, so
            # CUDA's index (cuda:0 of a rank bound to the node's fourth GPU) names another GPU
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(torch.cuda.get_device_properties(device).uuid))
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


def nvml_uuid(cuda_uuid) -> str:
    """NVML's name of a GPU ("GPU-xxxxxxxx-xxxx-...") from CUDA's device-properties UUID (printed
    without the prefix). MIG instances keep their own "MIG-" prefix."""
    text = str(cuda_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
