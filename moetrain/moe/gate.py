"""The router as a module: holds the gate weights (and noise weights, aux-free biases, the gated
residual projection) and calls the pure functions of routing.py / routers.py.

Randomness (GShard's uniform draws, noisy top-k's normal noise, jitter) comes from the default
torch generator of the device, which the trainer seeds per rank from train.seed and the
checkpoint saves, so runs are reproducible and resumable.

Shape legend: T tokens, D dim, E experts (F FFN experts + zero-computation experts), K choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moetrain.moe import routers as R
from moetrain.moe.routing import Routing, count_ids, load_balancing_loss, router_entropy, router_z_loss
from moetrain.precision import autocast_off

ROUTER_KINDS = ("topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free")


@dataclass(frozen=True)
class GateOut:
    routing: Routing
    aux_loss: torch.Tensor        # the method's balance loss (unscaled)
    z_loss: torch.Tensor
    entropy: torch.Tensor
    logits_TE: torch.Tensor       # for the next layer's gated residual (MoE++)


class Gate(nn.Module):
    def __init__(self, dim: int, num_ffn_experts: int, num_zero_experts: int, top_k: int, kind: str,
                 capacity_factor: Optional[float], min_capacity: int, normalize: bool = True,
                 jitter: float = 0.0, gated_residual: bool = False, reroute: bool = False,
                 aux_scope: str = "micro_batch", aux_free_gamma: float = 1e-3):
        super().__init__()
        assert kind in ROUTER_KINDS, kind
        self.kind, self.top_k = kind, top_k
        self.num_ffn, self.num_total = num_ffn_experts, num_ffn_experts + num_zero_experts
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.normalize = normalize and kind != "switch"
        self.jitter, self.reroute, self.aux_scope = jitter, reroute, aux_scope
        self.aux_free_gamma = aux_free_gamma
        # plain parameters shaped like nn.Linear weights [out, in]
        self.weight = nn.Parameter(torch.empty(self.num_total, dim))
        self.noise_weight = nn.Parameter(torch.empty(self.num_total, dim)) if kind == "noisy_topk" else None
        self.residual_weight = (nn.Parameter(torch.empty(self.num_total, self.num_total))
                                if gated_residual else None)
        if kind == "aux_free":
            self.register_buffer("expert_bias", torch.zeros(self.num_total))
        self.balance_group = None      # set by apply_routing_groups for aux_scope=global_batch
        self.balance_group_size = 1

    def capacity(self, num_tokens: int) -> Optional[int]:
        from moetrain.moe.routing import expert_capacity
        cf = self.capacity_factor
        if self.kind == "expert_choice" and cf is None:
            cf = 1.0      # capacity-bound by definition (config validation refuses null): C = k*T/E
        return expert_capacity(num_tokens, self.num_ffn, self.top_k, cf, self.min_capacity)

    def forward(self, x_TD: torch.Tensor, prev_logits_TE: Optional[torch.Tensor], batch: int) -> GateOut:
        with autocast_off(x_TD.device.type):
            return self._route(x_TD, prev_logits_TE, batch)

    def _route(self, x_TD: torch.Tensor, prev_logits_TE: Optional[torch.Tensor], batch: int) -> GateOut:
        """Routing math in at least fp32, autocast off (forward() turns it off): under bf16
        autocast the router matmul would otherwise round the logits to bf16 before any cast,
        which makes ties and wrong top-k choices."""
        T = x_TD.shape[0]
        dt = torch.promote_types(x_TD.dtype, torch.float32)
        x_TD = x_TD.to(dt)
        gate_in = x_TD
        if self.training and self.jitter > 0:
            gate_in = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = F.linear(gate_in, self.weight.to(dt))
        if self.residual_weight is not None and prev_logits_TE is not None:
            # MoE++ gated residual: this layer's logits see the previous MoE layer's logits
            logits = logits + F.linear(prev_logits_TE.to(dt), self.residual_weight.to(dt))
        capacity = self.capacity(T)
        z_loss = router_z_loss(logits)

        if self.kind == "expert_choice":
            routing, probs = R.route_expert_choice(logits, capacity)
            zero = logits.new_zeros(())
            return GateOut(routing, zero, z_loss, router_entropy(probs.detach()), logits)

        aux_override = None
        if self.kind == "gshard":
            u = torch.rand(T, device=logits.device) if self.training else torch.zeros(T, device=logits.device)
            sel = R.select_gshard(logits, u)
            aux_override = R.gshard_aux_loss(sel.probs_TE, sel.expert_idx_TK[:, 0])
        elif self.kind == "noisy_topk":
            noise_std = F.softplus(F.linear(x_TD, self.noise_weight.to(dt))) + 1e-2
            normal = torch.randn_like(logits) if self.training else None
            sel, noisy = R.select_noisy_topk(logits, noise_std, normal, self.top_k)
            if normal is not None:
                importance, load = R.noisy_topk_losses(sel.probs_TE, logits, noisy, noise_std, self.top_k)
            else:
                importance, load = R.cv_squared(sel.probs_TE.sum(0)), logits.new_zeros(())
            aux_override = importance + load
        elif self.kind == "aux_free":
            sel = R.select_biased(logits, self.expert_bias, self.top_k)
        else:   # topk, switch
            sel = R.select_topk(logits, self.top_k, self.normalize)

        pref = sel.preference_TE() if self.reroute else None
        routing = R.apply_capacity(sel, self.num_ffn, capacity, pref)
        aux = aux_override if aux_override is not None else self._balance_loss(sel, batch)
        return GateOut(routing, aux, z_loss, router_entropy(sel.probs_TE.detach()), logits)

    def _balance_loss(self, sel: R.Selection, batch: int) -> torch.Tensor:
        idx = sel.expert_idx_TK
        if self.aux_scope == "sequence":
            T, E = sel.probs_TE.shape
            return R.sequence_balance_loss(sel.probs_TE.view(batch, T // batch, E), idx.view(batch, T // batch, -1))
        if self.aux_scope == "global_batch" and self.balance_group is not None and self.balance_group_size > 1:
            counts = count_ids(idx, sel.probs_TE.shape[1]).float()
            dist.all_reduce(counts, group=self.balance_group)   # f from every dp rank's tokens
            return R.balance_loss_from_counts(sel.probs_TE, counts, idx.numel() * self.balance_group_size)
        return load_balancing_loss(sel.probs_TE, idx)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-free balancing step, called by the trainer after the optimizer step with the
        global batch's per-expert load (identical on every rank, so biases stay in sync)."""
        if self.kind == "aux_free":
            self.expert_bias.copy_(R.aux_free_bias_update(self.expert_bias, load_E.to(self.expert_bias.device),
                                                          self.aux_free_gamma))
