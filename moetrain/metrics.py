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
import torch
import torch.distributed as dist

A2A_PHASES = ("counts", "dispatch", "combine", "dispatch_bwd", "combine_bwd")


@dataclass
class StepStats:
    """Sums over the micro-steps of one optimizer step, on one rank. The routing sums stay on
    the training device (no host sync per micro-step); the all-to-all timers are kept and
    resolved once, when the step is logged."""
    num_layers: int
    num_experts: int
    device: torch.device = torch.device("cpu")
    routed_LE: torch.Tensor = None
    kept_LE: torch.Tensor = None
    entropy_L: torch.Tensor = None
    recv_L: torch.Tensor = None
    timers: list = field(default_factory=list)
    micro_steps: int = 0

    def __post_init__(self):
        # float64: exact integer counts far beyond fp32's 2**24
        self.routed_LE = torch.zeros(self.num_layers, max(1, self.num_experts), dtype=torch.float64,
                                     device=self.device)
        self.kept_LE = torch.zeros_like(self.routed_LE)
        self.entropy_L = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        self.recv_L = torch.zeros_like(self.entropy_L)

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

    def flat(self, step_ms: float) -> torch.Tensor:
        """One float64 row on the training device: [step_ms, a2a bytes, micro steps, a2a ms per
        phase..., routed, kept, entropy, recv]."""
        a2a_ms, a2a_bytes = self.a2a_totals()
        head = [step_ms, a2a_bytes, float(self.micro_steps)] + [a2a_ms.get(p, 0.0) for p in A2A_PHASES]
        return torch.cat([torch.tensor(head, dtype=torch.float64, device=self.device), self.routed_LE.flatten(),
                          self.kept_LE.flatten(), self.entropy_L, self.recv_L])


def gather_stats(stats: StepStats, step_ms: float, group, world: int) -> torch.Tensor:
    """All ranks call this together; returns [world, F] on the host on every rank (world 1: no
    collective). The gathered tensor lives on the stats' device, as NCCL requires."""
    flat = stats.flat(step_ms)
    if world == 1:
        return flat[None].cpu()
    out = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(out, flat, group=group)
    return torch.stack(out).cpu()


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
