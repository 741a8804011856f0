"""MoELayer = router + dispatcher + grouped experts (+ shared experts, + zero-computation experts).
Returns (y, MoEAux).

The layer adds nothing to the residual itself: a copy dropped for capacity contributes zero, so
a token with every copy dropped leaves the block with only its residual stream.

MoE++ zero-computation experts (ids F.. after the F FFN experts) live on every rank and never
enter the all-to-all: zero -> 0, copy -> x, constant j -> a1*x + a2*v_j with
[a1, a2] = softmax(W_j x).

Shape legend: B batch, S sequence, T = B*S tokens, D dim, E experts, F FFN experts, K choices.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.profiler import record_function

from moetrain.config import MoEConfig
from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts, SwiGLU
from moetrain.moe.router import Router, RouterOut
from moetrain.moe.routing import balance_loss_from_counts
from moetrain.parallel.comm import CommTimer
from moetrain.precision import compute_dtype


@dataclass
class MoEAux:
    """Per-layer, per-micro-step results that are not the hidden states.

    aux_loss, z_loss: differentiable scalars (unscaled; the trainer applies the coefficients).
    counts_E / kept_E: copies routed to / kept by each expert (FFN and zero-computation) from
    this rank's tokens. recv_tokens: rows this rank's experts processed (a 0-dim device tensor:
    reading it is a host sync, so the trainer reads it once per logged step). logits: for the next
    layer's gated residual. timer: all-to-all timings (backward records land during
    loss.backward(), so read it after).
    """
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts_E: torch.Tensor
    kept_E: torch.Tensor
    entropy: torch.Tensor
    recv_tokens: torch.Tensor
    num_copies: int
    logits: Optional[torch.Tensor] = None
    timer: CommTimer = field(default_factory=CommTimer)


class MoELayer(nn.Module):
    def __init__(self, moe: MoEConfig, dim: int, expert_hidden: int):
        """expert_hidden = Config.expert_hidden (one fine-grained expert); shared experts are coarse."""
        super().__init__()
        self.num_experts, self.top_k = moe.num_ffn_experts, moe.routed_top_k
        z = moe.zero_experts
        self.num_zero, self.num_copy, self.num_const = z.zero, z.copy, z.constant
        self.overlap = moe.overlap
        self.router = Router(moe, dim)
        self.experts = GroupedExperts(self.num_experts, dim, expert_hidden, moe.grouped_mm)
        shared_hidden = expert_hidden * moe.expert_granularity * moe.shared_experts
        self.shared = SwiGLU(dim, shared_hidden) if moe.shared_experts > 0 else None
        if self.num_const > 0:
            self.const_w = nn.Parameter(torch.empty(self.num_const, 2, dim))
            self.const_v = nn.Parameter(torch.empty(self.num_const, dim))
        self.dispatcher = LocalDispatcher(self.num_experts)
        self.count_sum = None          # dispatch.GroupSum over dp (aux_loss_scope=global_batch, dp > 1)

    def forward(self, x_BSD: torch.Tensor, prev_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        with record_function("moe/router"):
            g = self.router(x_TD, prev_logits, B)
            aux_loss = g.aux_loss if g.aux_loss is not None else self._global_balance_loss(g)
        routing = g.routing
        ffn_routing = routing
        if self.num_zero + self.num_copy + self.num_const > 0:
            ffn_routing = dataclasses.replace(routing, kept_TK=routing.kept_TK & (routing.expert_idx_TK < self.num_experts))

        shared_fn = (lambda: self.shared(x_TD)) if self.shared is not None else None
        # token copies travel and meet the experts in the compute dtype (bf16 under autocast):
        # half the all-to-all bytes of the fp32 residual stream
        x_send = x_TD.to(compute_dtype(x_TD))
        # profiler labels (tools/profile_step.py); all-to-alls inside carry "moe/a2a/*" labels
        with record_function("moe/dispatch"):
            x_local, counts_local, meta, shared_out = self.dispatcher.dispatch(
                x_send, ffn_routing, shared_fn if self.overlap else None,
                host_counts=self.experts.needs_host_counts(x_send))
        if shared_fn is not None and shared_out is None:
            shared_out = shared_fn()
        with record_function("moe/experts"):
            y_local = self.experts(x_local, counts_local)
        with record_function("moe/combine"):
            y_TD = self.dispatcher.combine(y_local, meta)
        if shared_out is not None:
            y_TD = y_TD + shared_out
        if self.num_zero + self.num_copy + self.num_const > 0:
            y_TD = y_TD + self._zero_compute(x_TD, routing)

        aux = MoEAux(aux_loss=aux_loss, z_loss=g.z_loss, counts_E=routing.counts_E.detach(),
                     kept_E=routing.kept_E.detach(), entropy=g.entropy, recv_tokens=counts_local.device.sum(),
                     num_copies=routing.expert_idx_TK.numel(), logits=g.logits_TE, timer=meta.timer)
        return y_TD.view(B, S, D).to(x_BSD.dtype), aux

    def _global_balance_loss(self, g: RouterOut) -> torch.Tensor:
        """aux_loss_scope=global_batch: f from every data-parallel rank's tokens (the counts summed
        through the door), P from this rank's; without a group, this rank's micro batch."""
        counts, ranks = g.routing.counts_E.float(), 1
        if self.count_sum is not None:
            counts, ranks = self.count_sum(counts), self.count_sum.size
        return balance_loss_from_counts(g.probs_TE, counts, g.routing.expert_idx_TK.numel() * ranks)

    def _zero_compute(self, x_TD: torch.Tensor, routing) -> torch.Tensor:
        """Weighted outputs of the copy and constant experts (zero experts add nothing)."""
        F_, Z, Cp = self.num_experts, self.num_zero, self.num_copy
        idx, w, kept = routing.expert_idx_TK, routing.weights_TK.to(x_TD.dtype), routing.kept_TK
        is_copy = kept & (idx >= F_ + Z) & (idx < F_ + Z + Cp)
        out = (w * is_copy).sum(1, keepdim=True) * x_TD
        if self.num_const > 0:
            first_const = F_ + Z + Cp
            is_const = kept & (idx >= first_const)
            w_TC = x_TD.new_zeros(x_TD.shape[0], self.num_const)
            w_TC.scatter_add_(1, torch.where(is_const, idx - first_const, 0), w * is_const)
            alpha_TC2 = torch.softmax(torch.einsum("td,cjd->tcj", x_TD, self.const_w), dim=-1)
            const_TCD = alpha_TC2[..., :1] * x_TD[:, None, :] + alpha_TC2[..., 1:] * self.const_v[None]
            out = out + torch.einsum("tc,tcd->td", w_TC, const_TCD)
        return out
