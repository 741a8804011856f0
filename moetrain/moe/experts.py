"""Experts as stacked SwiGLU weights, computed over contiguous per-expert slices.

Weights: w1, w3 [L, D, H] and w2 [L, H, D] for the L experts (slots) held by this process;
`expert_ids[i]` is the global id of the expert in slot i (set by apply_ep: contiguous for the static
placement, any sorted set under moe.placement=balanced, where another rank may hold a replica of the
same expert; used by deterministic init, checkpoints and the replica gradient sum).

Three ways to run the grouped matmul on rows sorted by expert (`ExpertCounts` gives slice lengths):
  loop    - per-slice matmuls inside one autograd node (moe/grouped_swiglu.py); no padding
            waste; on CPU small experts are spread over the intra-op threads. Needs the counts
            on the host.
  bmm     - pad every slice to the largest one and use one batched matmul; waste = padding.
            Needs the largest count on the host.
  grouped - torch._grouped_mm with int32 cumulative offsets: one kernel per GEMM, no waste, and
            the counts never leave the device. bf16 only, and every row stride a multiple of
            16 bytes: dim and the (local) expert hidden size multiples of 8.
`auto` (`choose_impl`) picks grouped on CUDA GPUs of compute capability 9.0 or newer (Hopper,
Blackwell) when the compute dtype is bf16 and the sizes are aligned; loop otherwise (older GPUs run
_grouped_mm through a per-group fallback that reads the offsets on the host; CPU runs loop).

Rows past the last offset: the sync-free local dispatch (moe/dispatch.py) hands the grouped
path all T*K copies with the dropped ones after the last offset. _grouped_mm leaves those output
rows, and the matching rows of its input gradient, uninitialized (pytorch#154557: by design);
both are masked with torch.where (never multiplied: 0 * NaN = NaN).

Shape legend: N rows (token copies), D model dim, H expert hidden, L local experts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moetrain.config import grouped_mm_misfit
from moetrain.moe.grouped_swiglu import grouped_swiglu
from moetrain.precision import autocast_off, compute_dtype

IMPLS = ("auto", "loop", "bmm", "grouped")


@dataclass(frozen=True)
class ExpertCounts:
    """Rows per local expert. `device`: int64 [L] on the rows' device, always. `host`: the same
    as a list when the dispatcher already has it without a new sync (expert parallelism: the
    split exchange), else None. With host None, x may carry extra rows after the last expert's
    (the dropped copies of the sync-free dispatch); they are ignored and come back as zeros."""
    device: torch.Tensor
    host: Optional[list] = None

    def to_host(self) -> list:
        return self.host if self.host is not None else self.device.tolist()   # sync ok: only without host counts


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def choose_impl(requested: str, device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> tuple[str, str]:
    """(implementation, why) for `moe.grouped_mm=requested` on this device and compute dtype."""
    if requested != "auto":
        return requested, "moe.grouped_mm=" + requested
    if device.type != "cuda":
        return "loop", f"{device.type}: per-expert GEMMs"
    if not hasattr(torch, "_grouped_mm"):
        return "loop", f"torch {torch.__version__} has no _grouped_mm"
    major, minor = _capability(device)
    if major < 9:
        return "loop", f"compute capability {major}.{minor} < 9.0: _grouped_mm would fall back to a host loop"
    if dtype != torch.bfloat16:
        return "loop", f"compute dtype {dtype} (_grouped_mm is bf16 only)"
    misfit = grouped_mm_misfit(dim, hidden)
    if misfit:
        return "loop", misfit
    return "grouped", f"torch._grouped_mm, bf16, compute capability {major}.{minor}"


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        assert impl in IMPLS, impl
        self.num_experts = num_experts     # experts held here (local slots)
        self.global_experts = num_experts  # experts in the whole model
        self.dim, self.hidden = dim, hidden
        self.impl = impl
        self.expert_ids: list[int] = list(range(num_experts))
        self.spread = None   # CPU loop: spread small experts over threads (None = auto)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def shard_(self, offset: int, count: int) -> None:
        """Keep experts [offset, offset+count) of the current set (expert parallelism)."""
        self.hold_(self.expert_ids[offset:offset + count])

    def hold_(self, ids) -> None:
        """Keep the global experts `ids` of the current set, one slot each in this order (an id may
        not repeat; apply_ep calls this before init, which fills every slot by its global id)."""
        where = {e: i for i, e in enumerate(self.expert_ids)}
        assert len(set(ids)) == len(ids) and all(e in where for e in ids), (ids, self.expert_ids)
        rows = torch.tensor([where[e] for e in ids], dtype=torch.long)
        for name in ("w1", "w3", "w2"):
            full = getattr(self, name).detach()
            setattr(self, name, nn.Parameter(full.index_select(0, rows.to(full.device))))
        self.expert_ids = [int(e) for e in ids]
        self.num_experts = len(ids)

    @property
    def expert_offset(self) -> int:
        """Global id of slot 0 (the static placement's slots are contiguous from there)."""
        return self.expert_ids[0]

    def pick_impl(self, x_ND: torch.Tensor) -> str:
        # the local hidden size (expert tensor parallelism shards it: w1 is then a DTensor on the
        # tp mesh, and forward sees its local shard) is what the kernel sees
        w1 = self.w1.to_local() if isinstance(self.w1, DTensor) else self.w1
        return choose_impl(self.impl, x_ND.device, compute_dtype(x_ND), self.dim, w1.shape[-1])[0]

    def needs_host_counts(self, x_ND: torch.Tensor) -> bool:
        """Whether forward() reads the counts on the host (the dispatcher then provides them)."""
        return self.pick_impl(x_ND) != "grouped"

    def forward(self, x_ND: torch.Tensor, counts: ExpertCounts) -> torch.Tensor:
        """Rows of x_ND sorted by local expert -> expert outputs [N, D] in the compute dtype."""
        impl = self.pick_impl(x_ND)
        if impl == "grouped":
            return self._forward_grouped(x_ND, counts)
        counts_L = counts.to_host()
        n = sum(counts_L)
        if n < x_ND.shape[0]:        # the sync-free dispatch's dropped copies: no output, no gradient
            y = self._forward_rows(impl, x_ND[:n], counts_L, counts.device)
            return torch.cat([y, y.new_zeros(x_ND.shape[0] - n, y.shape[1])])
        return self._forward_rows(impl, x_ND, counts_L, counts.device)

    def _forward_rows(self, impl, x_ND, counts_L, counts_dev):
        if impl == "bmm":
            return self._forward_bmm(x_ND, counts_L, counts_dev)
        return self._forward_loop(x_ND, counts_L)

    def _forward_loop(self, x_ND, counts_L):
        w1, w3, w2 = self.w1, self.w3, self.w2
        dev = x_ND.device.type
        dt = compute_dtype(x_ND)
        # the op writes into preallocated buffers (mm(out=)), which autocast does not cast:
        # cast once here, as autocast would, and run the op with autocast off
        with autocast_off(dev):
            return grouped_swiglu(x_ND.to(dt), w1.to(dt), w3.to(dt), w2.to(dt), counts_L, self.spread)

    def _touch(self):
        return self.w1.sum() + self.w2.sum() + self.w3.sum()

    def _forward_bmm(self, x_ND, counts_L, counts):
        """counts_L (host) sizes the padded batch; counts (the same, on x's device) places the rows
        without a host-to-device copy."""
        L, C = len(counts_L), max(counts_L) if counts_L else 0
        if C == 0:
            return x_ND @ self.w1.new_zeros(self.dim, self.dim) + 0.0 * self._touch()
        N = x_ND.shape[0]
        expert_of_row = torch.repeat_interleave(torch.arange(L, device=x_ND.device), counts, output_size=N)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(N, device=x_ND.device) - starts[expert_of_row]
        x_LCD = x_ND.new_zeros(L, C, self.dim)
        x_LCD[expert_of_row, slot] = x_ND
        h = F.silu(torch.bmm(x_LCD, self.w1)) * torch.bmm(x_LCD, self.w3)
        y_LCD = torch.bmm(h, self.w2)
        return y_LCD[expert_of_row, slot]

    def _forward_grouped(self, x_ND, counts: ExpertCounts):
        # the GPU kernel is bf16-only (under autocast x arrives in bf16 already); torch's CPU
        # kernel also takes fp32, which lets tests check this path's index math exactly
        dt = compute_dtype(x_ND) if x_ND.device.type == "cpu" else torch.bfloat16
        offs = torch.cumsum(counts.device, 0, dtype=torch.int32)
        padded = counts.host is None
        x = x_ND.to(dt)
        if padded:
            valid = (torch.arange(x.shape[0], device=x.device) < offs[-1:]).unsqueeze(1)
            x = torch.where(valid, x, 0)       # its backward masks the uninitialized dX rows
        w1, w3, w2 = (_grouped_weight(w, dt, counts.device) for w in (self.w1, self.w3, self.w2))
        with autocast_off(x.device.type):
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            y = torch._grouped_mm(h, w2, offs=offs)
        if padded:
            y = torch.where(valid, y, 0)
        return _ContiguousGrad.apply(y)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: _grouped_mm's backward
    refuses the stride-0 gradients autograd hands over for e.g. y.sum() (also with no rows)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() == 0:       # "contiguous" already, yet possibly with stride-0 dims
            return grad.new_zeros(grad.shape)
        return grad.contiguous()


def _grouped_weight(w: torch.Tensor, dt: torch.dtype, counts_L: torch.Tensor) -> torch.Tensor:
    """The bf16 weight the grouped kernel reads. On Blackwell (compute capability 10.x) some
    torch builds return non-zero weight gradients for experts with zero rows (pytorch#172439):
    there the gradient of an empty expert is masked to zero."""
    w = w.to(dt)
    if w.is_cuda and _capability(w.device)[0] >= 10:
        w = _MaskEmptyExpertGrad.apply(w, counts_L > 0)
    return w


class _MaskEmptyExpertGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, nonempty_L):
        ctx.save_for_backward(nonempty_L)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        nonempty_L, = ctx.saved_tensors
        return torch.where(nonempty_L.view(-1, 1, 1), grad, 0), None


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
