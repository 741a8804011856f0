"""MoELayer = router + dispatcher + grouped experts (+ shared experts). Returns (y, MoEAux).

The layer adds nothing to the residual itself: a copy dropped for capacity contributes zero, so
a token with every copy dropped leaves the block with only its residual stream.

Shape legend: B batch, S sequence, T = B*S tokens, D dim, E experts, K choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts, SwiGLU
from moetrain.moe.routing import (expert_capacity, load_balancing_loss, route_topk, router_entropy,
                                  router_z_loss)
from moetrain.parallel.comm import CommTimer


@dataclass
class MoEAux:
    """Per-layer, per-micro-step results that are not the hidden states.

    aux_loss, z_loss: differentiable scalars (unscaled; the trainer applies the coefficients).
    counts_E / kept_E: copies routed to / kept by each global expert from this rank's tokens.
    recv_tokens: rows this rank's experts processed. timer: all-to-all timings (filled in
    backward too, so read it after loss.backward()).
    """
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts_E: torch.Tensor
    kept_E: torch.Tensor
    entropy: torch.Tensor
    recv_tokens: int
    num_copies: int
    timer: CommTimer = field(default_factory=CommTimer)


class MoELayer(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, expert_hidden: int,
                 capacity_factor: Optional[float], min_capacity: int = 4, router: str = "topk",
                 shared_experts: int = 0, norm_topk_prob: bool = True, router_jitter: float = 0.0,
                 grouped_mm: str = "auto", overlap: bool = True):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.router_kind = router
        self.normalize = norm_topk_prob and router != "switch"
        self.router_jitter = router_jitter
        self.overlap = overlap
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, dim, expert_hidden, grouped_mm)
        self.shared = SwiGLU(dim, expert_hidden * shared_experts) if shared_experts > 0 else None
        self.dispatcher = LocalDispatcher(num_experts)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        router_in = x_TD
        if self.training and self.router_jitter > 0:
            # Switch-style multiplicative jitter on the router input only (experts see clean x)
            noise = torch.empty_like(x_TD).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
            router_in = x_TD * noise
        logits_TE = self.router(router_in).float()
        capacity = expert_capacity(B * S, self.num_experts, self.top_k, self.capacity_factor, self.min_capacity)
        routing, probs_TE = route_topk(logits_TE, self.top_k, capacity, self.normalize)

        shared_fn = (lambda: self.shared(x_TD)) if (self.shared is not None) else None
        x_local, counts_local, meta, shared_out = self.dispatcher.dispatch(
            x_TD, routing, shared_fn if self.overlap else None)
        if shared_fn is not None and shared_out is None:
            shared_out = shared_fn()
        y_local = self.experts(x_local, counts_local)
        y_TD = self.dispatcher.combine(y_local, meta)
        if shared_out is not None:
            y_TD = y_TD + shared_out

        aux = MoEAux(
            aux_loss=load_balancing_loss(probs_TE, routing.expert_idx_TK),
            z_loss=router_z_loss(logits_TE),
            counts_E=routing.counts_E.detach(),
            kept_E=routing.kept_E.detach(),
            entropy=router_entropy(probs_TE.detach()),
            recv_tokens=int(sum(counts_local)),
            num_copies=routing.expert_idx_TK.numel(),
            timer=meta.timer,
        )
        return y_TD.view(B, S, D).to(x_BSD.dtype), aux
