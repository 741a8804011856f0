"""The routing methods: one registry entry per `moe.router`, and the router module that runs them.

`ROUTERS[name]` (a `RouterSpec`) holds the method's selection function (its math in routing.py),
what it needs (capacity, noise weights, bias state), what it supports (EP, dropless), how its
gates behave, and the config checks that follow. moetrain.config and moetrain.growth read it.
Adding a router = one entry here + its math in routing.py + its tests.

`Router` holds the gate weights (noise weights, aux-free biases, gated residual projection) and
returns routing, losses and counts. It runs no collective: the global-batch balance loss needs
the counts summed over dp, which its caller (MoELayer) does through dispatch.GroupSum.
Randomness (GShard's uniform draws, noisy top-k's noise, jitter) comes from the device's default
generator, which the trainer seeds per rank from train.seed and the checkpoint saves.

Shape legend: T tokens, D dim, E experts (F FFN experts + zero-computation experts), K choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import Config, MoEConfig, need
from moetrain.moe import routing as R
from moetrain.precision import autocast_off


@dataclass(frozen=True)
class RouterSpec:
    """One routing method. `select` for a token-choice method: (router, x_TD, logits_TE) ->
    (Selection, its own balance loss or None for the Switch loss of moe.aux_loss_scope); for an
    expert-choice method: (logits_TE, capacity) -> (Routing, probs_TE), no capacity step after."""
    name: str
    select: Callable
    token_choice: bool = True         # tokens pick experts (else experts pick tokens: never overflows)
    top_k: Optional[int] = None       # the only moe.top_k it runs (Switch 1, GShard 2)
    gates: str = "normalized"         # a token's k gates sum to 1 | "norm_topk_prob": when on and k > 1 | "raw"
    own_balance_loss: bool = False    # its paper's loss over the micro batch replaces the Switch loss
    noise: bool = False               # needs noise weights W_noise [E, D]
    bias_state: bool = False          # needs a per-expert bias buffer, updated after each optimizer step
    dropless: bool = True             # supports moe.capacity_factor=null (else needs a capacity)
    ep: bool = True                   # supports expert parallelism (parallel.ep > 1)

    def gates_sum_to_one(self, moe: MoEConfig) -> bool:
        """Whether the K gates of every token sum to 1 whatever the logits."""
        if self.gates == "norm_topk_prob":
            return moe.norm_topk_prob and moe.routed_top_k > 1
        return self.gates == "normalized"

    def validate(self, cfg: Config) -> None:
        """The config checks the fields above imply (after the generic moe.* checks)."""
        e, why = cfg.moe, f"router '{self.name}'"
        if self.top_k is not None:
            need(e.top_k == self.top_k, "moe.top_k", e.top_k, f"{why} is top-{self.top_k}: set moe.top_k={self.top_k}")
        if not self.token_choice:
            need(e.num_zero_experts == 0, "moe.zero_experts", f"{e.num_zero_experts} experts",
                 f"zero-computation experts need a token-choice router (not {self.name})")
            need(e.overflow == "residual", "moe.overflow", e.overflow,
                 f"{self.name} never overflows (each expert takes exactly C tokens): use residual")
        if self.own_balance_loss:
            need(e.aux_loss_scope == "micro_batch", "moe.aux_loss_scope", e.aux_loss_scope,
                 f"{why} has its own balance loss over the micro batch: use micro_batch")
        need(self.dropless or e.capacity_factor is not None, "moe.capacity_factor", None,
             f"{why} is capacity-bound by definition (each expert takes C = capacity_factor*top_k*T/E tokens): "
             "set a number, e.g. 1.0")
        need(self.ep or cfg.parallel.ep in (1, "auto"), "parallel.ep", cfg.parallel.ep, f"{why} does not run expert parallel")
        if e.renormalize_after_drop:
            fits = [s.name for s in ROUTERS.values() if s.token_choice and s.gates != "raw"]
            need(self.token_choice and e.routed_top_k > 1 and self.gates_sum_to_one(e), "moe.renormalize_after_drop",
                 True, f"needs top-k > 1 gates that sum to 1 (routers {', '.join(fits)}; topk with "
                 f"moe.norm_topk_prob), not {why} at top-{e.routed_top_k}, norm_topk_prob={e.norm_topk_prob}")
            need(e.capacity_factor is not None, "moe.renormalize_after_drop", True,
                 "nothing is dropped with moe.capacity_factor=null")


def _select_gshard(r: "Router", x_TD, logits_TE):
    T = logits_TE.shape[0]
    u = torch.rand(T, device=logits_TE.device) if r.training else torch.zeros(T, device=logits_TE.device)
    sel = R.select_gshard(logits_TE, u)
    return sel, R.gshard_aux_loss(sel.probs_TE, sel.expert_idx_TK[:, 0])


def _select_noisy_topk(r: "Router", x_TD, logits_TE):
    noise_std = F.softplus(F.linear(x_TD, r.noise_weight.to(x_TD.dtype))) + 1e-2
    normal = torch.randn_like(logits_TE) if r.training else None
    sel, noisy = R.select_noisy_topk(logits_TE, noise_std, normal, r.top_k)
    if normal is None:
        return sel, R.cv_squared(sel.probs_TE.sum(0)) + logits_TE.new_zeros(())
    importance, load = R.noisy_topk_losses(sel.probs_TE, logits_TE, noisy, noise_std, r.top_k)
    return sel, importance + load


ROUTERS: dict[str, RouterSpec] = {s.name: s for s in (
    RouterSpec("topk", lambda r, x, logits: (R.select_topk(logits, r.top_k, r.cfg.norm_topk_prob), None),
               gates="norm_topk_prob"),
    RouterSpec("switch", lambda r, x, logits: (R.select_topk(logits, r.top_k, False), None), top_k=1, gates="raw"),
    RouterSpec("gshard", _select_gshard, top_k=2, own_balance_loss=True),
    RouterSpec("noisy_topk", _select_noisy_topk, own_balance_loss=True, noise=True),
    RouterSpec("expert_choice", R.route_expert_choice, token_choice=False, gates="raw", own_balance_loss=True,
               dropless=False),
    RouterSpec("aux_free", lambda r, x, logits: (R.select_biased(logits, r.expert_bias, r.top_k), None),
               bias_state=True),
)}


@dataclass(frozen=True)
class RouterOut:
    routing: R.Routing
    aux_loss: Optional[torch.Tensor]   # unscaled; None = global batch: the caller sums counts_E over dp
    z_loss: torch.Tensor
    entropy: torch.Tensor
    logits_TE: torch.Tensor            # for the next layer's gated residual (MoE++)
    probs_TE: torch.Tensor             # P of the balance loss


class Router(nn.Module):
    def __init__(self, moe: MoEConfig, dim: int):
        super().__init__()
        self.cfg, self.spec = moe, ROUTERS[moe.router]
        self.kind, self.top_k = moe.router, moe.routed_top_k
        self.num_ffn, self.num_total = moe.num_ffn_experts, moe.num_router_outputs
        # plain parameters shaped like nn.Linear weights [out, in]
        self.weight = nn.Parameter(torch.empty(self.num_total, dim))
        self.noise_weight = nn.Parameter(torch.empty(self.num_total, dim)) if self.spec.noise else None
        self.residual_weight = (nn.Parameter(torch.empty(self.num_total, self.num_total))
                                if moe.gated_residual else None)
        if self.spec.bias_state:
            self.register_buffer("expert_bias", torch.zeros(self.num_total))

    def capacity(self, num_tokens: int) -> Optional[int]:
        cf = self.cfg.capacity_factor
        if cf is None and not self.spec.dropless:
            cf = 1.0      # capacity-bound by definition (config validation refuses null): C = k*T/E
        return R.expert_capacity(num_tokens, self.num_ffn, self.top_k, cf, self.cfg.min_capacity)

    def forward(self, x_TD: torch.Tensor, prev_logits_TE: Optional[torch.Tensor], batch: int) -> RouterOut:
        with autocast_off(x_TD.device.type):
            return self._route(x_TD, prev_logits_TE, batch)

    def _route(self, x_TD: torch.Tensor, prev_logits_TE: Optional[torch.Tensor], batch: int) -> RouterOut:
        """Routing math in at least fp32, autocast off (forward() turns it off): under bf16
        autocast the router matmul would otherwise round the logits to bf16 before any cast,
        which makes ties and wrong top-k choices."""
        x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        logits = self._logits(x_TD, prev_logits_TE)
        capacity = self.capacity(x_TD.shape[0])
        z_loss = R.router_z_loss(logits)
        if not self.spec.token_choice:
            routing, probs = self.spec.select(logits, capacity)
            return RouterOut(routing, logits.new_zeros(()), z_loss, R.router_entropy(probs.detach()), logits, probs)
        sel, own_aux = self.spec.select(self, x_TD, logits)
        pref = sel.preference_TE() if self.cfg.overflow == "reroute" else None
        routing = R.apply_capacity(sel, self.num_ffn, capacity, pref)
        if self.cfg.renormalize_after_drop:
            routing = R.renormalize_kept(routing)
        aux = own_aux if own_aux is not None else self._balance_loss(sel, batch)
        return RouterOut(routing, aux, z_loss, R.router_entropy(sel.probs_TE.detach()), logits, sel.probs_TE)

    def _logits(self, x_TD: torch.Tensor, prev_logits_TE: Optional[torch.Tensor]) -> torch.Tensor:
        dt = x_TD.dtype
        gate_in = x_TD
        if self.training and self.cfg.router_jitter > 0:
            eps = self.cfg.router_jitter
            gate_in = x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)
        logits = F.linear(gate_in, self.weight.to(dt))
        if self.residual_weight is not None and prev_logits_TE is not None:
            # MoE++ gated residual: this layer's logits see the previous MoE layer's logits
            logits = logits + F.linear(prev_logits_TE.to(dt), self.residual_weight.to(dt))
        return logits

    def _balance_loss(self, sel: R.Selection, batch: int) -> Optional[torch.Tensor]:
        """Switch loss over the micro batch or per sequence; None over the global batch."""
        if self.cfg.aux_loss_scope == "global_batch":
            return None
        idx = sel.expert_idx_TK
        if self.cfg.aux_loss_scope == "sequence":
            T, E = sel.probs_TE.shape
            return R.sequence_balance_loss(sel.probs_TE.view(batch, T // batch, E), idx.view(batch, T // batch, -1))
        return R.load_balancing_loss(sel.probs_TE, idx)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-free balancing step, called by the trainer after the optimizer step with the
        global batch's per-expert load (identical on every rank, so biases stay in sync)."""
        if self.spec.bias_state:
            self.expert_bias.copy_(R.aux_free_bias_update(self.expert_bias, load_E.to(self.expert_bias.device),
                                                          self.cfg.aux_free_gamma))
