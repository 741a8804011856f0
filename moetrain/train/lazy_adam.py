"""Lazy AdamW: parameters whose gradient is a sparse COO tensor over rows (PEER expert tables with
moe.peer.sparse_updates) update only the rows in that gradient; dense gradients take torch's AdamW.

For a parameter p with sparse gradient (rows r, values g) at its t-th step (t = state["step"],
counted once per optimizer step in which p received a gradient, touched rows or not, so it equals
the global step for PEER tables on every layout):
    p[r]  *= 1 - lr * weight_decay                     decoupled decay, touched rows only
    m[r]   = lerp(m[r], g, 1 - beta1)
    v[r]   = beta2 * v[r] + (1 - beta2) * g^2
    p[r]  -= lr / (1 - beta1^t) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2^t) + eps)
and nothing else: rows outside r keep their weights AND their moments (not decayed; the lazy
Adam of TensorFlow Addons and torch.optim.SparseAdam, plus AdamW's decoupled decay applied when
a row is touched, so an untouched row is not decayed either). The bias corrections use the
global t (as lazy Adam does), not a per-row count. On the touched rows this is exactly
torch.optim.AdamW's single-tensor arithmetic (same op order), so a step in which every row is
touched equals AdamW bit for bit.

The state is AdamW's: step (fp32 scalar), exp_avg and exp_avg_sq as dense tensors shaped like
the parameter, updated in place on the touched rows. Checkpoints store it under the same keys as
AdamW's (checkpoint/state.py), so they resume at any layout and across the two modes. Cost per
step: O(touched rows x D) for these parameters, plus a sort of the touched row ids.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype


class LazyAdamW(torch.optim.AdamW):
    """torch.optim.AdamW, except that sparse-gradient parameters get the lazy row update above."""

    @torch.no_grad()
    def step(self, closure=None):
        held = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._lazy_update(p, p.grad, group)
                    held.append((p, p.grad))
                    p.grad = None         # AdamW's step skips it
        try:
            return super().step(closure)
        finally:
            for p, g in held:
                p.grad = g

    def _lazy_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:      # as AdamW's _init_group makes it (non-capturable, non-fused)
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        if grad.sparse_dim() != 1:      # rows x dense values is the layout this update reads
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        grad = _coalesced(grad)
        rows, g = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        w = p.index_select(0, rows)
        m = state["exp_avg"].index_select(0, rows)
        v = state["exp_avg_sq"].index_select(0, rows)
        if wd != 0:
            w.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = state["step"].item()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        p.index_copy_(0, rows, w)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """grad with unique sorted rows. Gradient clipping's in-place scaling clears the coalesced
    flag of a gradient that was coalesced (parallel/grads.SparseRowSum): re-flag it after an O(M)
    check of its row order instead of sorting it again."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):     # sync ok: sparse update
        return grad._coalesced_(True)
    return grad.coalesce()

