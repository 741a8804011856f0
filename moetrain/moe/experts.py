"""Experts as stacked SwiGLU weights, computed over contiguous per-expert slices.

Weights: w1, w3 [L, D, H] and w2 [L, H, D] for the L experts held by this process; `expert_offset`
is the global id of local expert 0 (set by apply_ep, used by deterministic init and checkpoints).

Three ways to run the grouped matmul on rows sorted by expert (counts_L gives slice lengths):
  loop    - per-slice matmuls inside one autograd node (moe/grouped_swiglu.py); no padding
            waste; on CPU small experts are spread over the intra-op threads.
  bmm     - pad every slice to the largest one and use one batched matmul; waste = padding.
  grouped - torch._grouped_mm with cumulative offsets (CUDA, bf16): one kernel, no waste.
`auto` picks grouped on CUDA when available, else loop (tools/bench_moe.py measures the choice).

Shape legend: N rows (token copies), D model dim, H expert hidden, L local experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.moe.grouped_swiglu import grouped_swiglu


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.num_experts = num_experts     # experts held here (local)
        self.dim, self.hidden = dim, hidden
        self.impl = impl
        self.expert_offset = 0
        self.spread = None   # CPU loop: spread small experts over threads (None = auto)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def shard_(self, offset: int, count: int) -> None:
        """Keep experts [offset, offset+count) of the current set (expert parallelism)."""
        for name in ("w1", "w3", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[offset:offset + count].clone()))
        self.expert_offset += offset
        self.num_experts = count

    def forward(self, x_ND: torch.Tensor, counts_L: list[int]) -> torch.Tensor:
        impl = self._pick_impl(x_ND)
        if impl == "grouped":
            return self._forward_grouped(x_ND, counts_L)
        if impl == "bmm":
            return self._forward_bmm(x_ND, counts_L)
        return self._forward_loop(x_ND, counts_L)

    def _pick_impl(self, x_ND: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        if x_ND.is_cuda and hasattr(torch, "_grouped_mm") and (
                x_ND.dtype == torch.bfloat16 or torch.get_autocast_dtype("cuda") == torch.bfloat16
                and torch.is_autocast_enabled("cuda")):
            return "grouped"
        return "loop"

    def _forward_loop(self, x_ND, counts_L):
        w1, w3, w2 = self.w1, self.w3, self.w2
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev):
            # the op writes into preallocated buffers (mm(out=)), which autocast does not cast:
            # cast once here, as autocast would, and run the op with autocast off
            dt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return grouped_swiglu(x_ND.to(dt), w1.to(dt), w3.to(dt), w2.to(dt), counts_L, self.spread)
        return grouped_swiglu(x_ND, w1, w3, w2, counts_L, self.spread)

    def _touch(self):
        return self.w1.sum() + self.w2.sum() + self.w3.sum()

    def _forward_bmm(self, x_ND, counts_L):
        L, C = len(counts_L), max(counts_L) if counts_L else 0
        if C == 0:
            return x_ND @ self.w1.new_zeros(self.dim, self.dim) + 0.0 * self._touch()
        counts = torch.tensor(counts_L, device=x_ND.device)
        expert_of_row = torch.repeat_interleave(torch.arange(L, device=x_ND.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(x_ND.shape[0], device=x_ND.device) - starts[expert_of_row]
        x_LCD = x_ND.new_zeros(L, C, self.dim)
        x_LCD[expert_of_row, slot] = x_ND
        h = F.silu(torch.bmm(x_LCD, self.w1)) * torch.bmm(x_LCD, self.w3)
        y_LCD = torch.bmm(h, self.w2)
        return y_LCD[expert_of_row, slot]

    def _forward_grouped(self, x_ND, counts_L):
        offs = torch.cumsum(torch.tensor(counts_L, device=x_ND.device, dtype=torch.int32), 0, dtype=torch.int32)
        # the grouped kernel is bf16-only; under autocast the residual stream arrives in fp32
        dt = torch.bfloat16
        in_dtype = x_ND.dtype
        x_ND = x_ND.to(dt)
        w1, w3, w2 = self.w1.to(dt), self.w3.to(dt), self.w2.to(dt)
        h = F.silu(torch._grouped_mm(x_ND, w1, offs=offs)) * torch._grouped_mm(x_ND, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs).to(in_dtype)


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
