"""moe.placement=balanced: which global experts each EP rank holds, re-placed from measured load.

The placement itself is pure math (moe/placement.py); this module applies it to a model and keeps
the replicas of an expert equal, which takes collectives:

  apply_placement  Before init: each MoE layer's GroupedExperts holds its rank's slots (S = (E+R)/ep
                   of them, slot i = global expert expert_ids[i]) and its AllToAllDispatcher sends
                   each copy to one of its expert's replicas (moe/permute.to_replicas). The first
                   placement spreads the R extra replicas over the lowest expert ids (no load
                   has been measured yet).
  sync_grads       After the data-parallel gradient sum: the gradient of a replicated expert is
                   the SUM over its replicas (each saw a share of the expert's copies): one flat
                   all-reduce over the EP group of the replicated experts' rows. Every replica
                   then holds the expert's whole gradient and AdamW keeps them bit-identical.
  primary_rows     Per expert weight, the slots that count in the gradient norm: one replica
                   per expert (parallel/grads.grad_sq_norms).
  rebalance        Every moe.rebalance_every steps, at the step boundary: the kept copies per
                   expert of the window, summed over the data-parallel group (one small
                   all-reduce), choose a new placement per layer (moe/placement.balanced_placement).
                   A layer is re-placed when that lowers its busiest rank's predicted load by at
                   least MIN_GAIN; then the weights and the AdamW moments of every slot whose
                   expert changes travel in ONE all-to-all over the EP group (every layer, every
                   tensor, packed per dtype), from a holder of the expert under the old placement.

Every rank computes the same placements from the same reduced loads, and the data-parallel
replicas of an EP rank (its edp group) do the same moves, so edp ranks keep holding equal slots.
The function the model computes does not depend on the placement (the routing is unchanged);
floating-point sums may differ in order (a token's copies are combined in arrival order).

Checkpoints store experts by global id (checkpoint/state.py, primary replicas are written once:
DCP keeps one copy of a key several ranks hold); the placement and the window's loads go into
the manifest (`state` / `restore`), so a resume at the same ep and R continues exactly, and any
other layout or placement starts from its own first placement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moetrain.moe.placement import Placement, balanced_placement, check_ranks, load_under

# re-place a layer only when the new placement lowers its busiest rank's predicted load by this
# fraction of the old one: smaller gains do not pay for moving weights and moments
MIN_GAIN = 0.03
# the replica gradient sum and the re-placement move work in pieces of about this many bytes
BUCKET_BYTES = 64 * 2 ** 20
_STATE_VERSION = 1


@dataclass
class Replacement:
    """What one rebalance did (rank 0 logs it on the step's metrics record)."""
    step: int
    before: list            # per layer: predicted imbalance (max/mean rank load) of the old placement on the window
    after: list             # ... of the placement in effect now
    moved: list             # per layer: whether it was re-placed
    ms: float               # wall time of the decision and the move
    bytes: int              # bytes this rank sent in the move
    ranks: list             # per layer: the experts each rank holds now
    replicas: list          # per layer: replicas per expert now

    def metrics(self) -> dict:
        out = {"placement.move_ms": round(self.ms, 3), "placement.move_mb": round(self.bytes / 2 ** 20, 4),
               "placement.layers_moved": sum(self.moved)}
        for i, (b, a) in enumerate(zip(self.before, self.after)):
            pre = f"placement.layer{i}"
            out[f"{pre}.imbalance_before"] = round(b, 4)
            out[f"{pre}.imbalance_after"] = round(a, 4)
            out[f"{pre}.replicas"] = list(self.replicas[i])
            out[f"{pre}.experts_per_rank"] = [list(r) for r in self.ranks[i]]
        return out


class ExpertPlacer:
    """Applies and maintains moe.placement=balanced for one model (see the module docstring)."""

    def __init__(self, layers: list, num_experts: int, redundant: int, every: int, par):
        self.layers = layers                 # the MoELayers, in model order
        self.E, self.R, self.every = num_experts, redundant, every
        self.par = par
        self.ep, self.ep_rank = par.dims.ep, par.ep_rank
        self.S = (num_experts + redundant) // self.ep
        self.first = balanced_placement([0.0] * num_experts, self.ep, redundant)
        self.placements: list[Placement] = [self.first] * len(layers)
        self.window = torch.zeros(len(layers), num_experts, dtype=torch.int64, device=par.device)
        self._rows: dict = {}          # primary_rows' cache, per placement

    # ------------------------------------------------------------------ model

    def apply(self) -> None:
        """Before init_weights (and before a checkpoint load): every layer holds its slots."""
        for layer, pl in zip(self.layers, self.placements):
            layer.experts.hold_(pl.ranks[self.ep_rank])
            self._route(layer, pl)

    def _route(self, layer, pl: Placement) -> None:
        layer.dispatcher.set_placement(pl.slots(), self.S, self.par.device)

    def add_load(self, kept_LE: torch.Tensor) -> None:
        """Kept copies per FFN expert of this rank's micro batch (on the device: no host sync)."""
        self.window += kept_LE[:, :self.E].to(self.window)

    def primary_rows(self) -> dict:
        """id(expert weight) -> the slot indices (a list) whose gradient counts in the norm: each
        expert's first replica. parallel/grads takes views of those slots: no copy, no host sync."""
        out = {}
        for layer, pl in zip(self.layers, self.placements):
            key = (id(layer), pl.ranks)
            if key not in self._rows:
                self._rows = {k: v for k, v in self._rows.items() if k[0] != id(layer)}
                self._rows[key] = [j for j, first in enumerate(pl.primary(self.ep_rank)) if first]
            for p in self._weights(layer):
                out[id(p)] = self._rows[key]
        return out

    @staticmethod
    def _weights(layer) -> list:
        ex = layer.experts
        return [ex.w1, ex.w3, ex.w2]

    # ------------------------------------------------------------------ gradients

    def sync_grads(self) -> None:
        """SUM each replicated expert's gradient over its replicas (all-reduces over the EP group,
        about BUCKET_BYTES each). An expert weight without a gradient gets zeros first, as its
        slice of the whole stack would at world size 1, so every rank's AdamW keeps the same state
        for every slot."""
        rows = []                           # (grads of the layer's weights, slot here or None)
        for layer, pl in zip(self.layers, self.placements):
            ws = self._weights(layer)
            for w in ws:
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
            grads = [w.grad for w in ws]
            mine = {e: j for j, e in enumerate(pl.ranks[self.ep_rank])}
            rows += [(grads, mine.get(e)) for e in range(self.E) if pl.replicas[e] > 1]
        if not rows:
            return
        width = sum(g[0].numel() for g in rows[0][0])
        per = max(1, BUCKET_BYTES // (width * rows[0][0][0].element_size()))
        for lo in range(0, len(rows), per):
            chunk = rows[lo:lo + per]
            flat = rows[0][0][0].new_zeros(len(chunk), width)
            for i, (grads, j) in enumerate(chunk):
                if j is not None:
                    torch.cat([g[j].reshape(-1) for g in grads], out=flat[i])
            dist.all_reduce(flat, group=self.par.ep_group)
            for i, (grads, j) in enumerate(chunk):
                if j is None:
                    continue
                offset = 0
                for g in grads:
                    n = g[j].numel()
                    g[j].copy_(flat[i, offset:offset + n].view_as(g[j]))
                    offset += n

    # ------------------------------------------------------------------ re-placement

    def due(self, step_done: int) -> bool:
        """Whether the step that brings the count of completed steps to `step_done` ends with a
        rebalance."""
        return self.ep > 1 and step_done > 0 and step_done % self.every == 0

    def rebalance(self, step_done: int, opt: torch.optim.Optimizer) -> Optional[Replacement]:
        """At the step boundary after step `step_done` (gradients cleared): re-place from the
        window's load when that pays. Collective over every rank. None when not due."""
        if not self.due(step_done):
            return None
        start = time.perf_counter()
        load_LE = self._window_totals()
        self.window.zero_()
        before, after, moved, new = [], [], [], []
        for pl, load_E in zip(self.placements, load_LE):
            old = load_under(pl.ranks, load_E)
            cand = balanced_placement(load_E, self.ep, self.R)
            take = max(cand.rank_load) < max(old.rank_load) * (1 - MIN_GAIN)
            chosen = cand if take else old
            before.append(old.imbalance)
            after.append(chosen.imbalance)
            moved.append(take)
            new.append(chosen)
        sent = self._move(new, opt) if any(moved) else 0
        self.placements = new
        for layer, pl, m in zip(self.layers, new, moved):
            if m:
                self._route(layer, pl)
                layer.experts.expert_ids = list(pl.ranks[self.ep_rank])
        if self.par.device.type == "cuda":
            torch.cuda.synchronize(self.par.device)
        return Replacement(step_done, before, after, moved, (time.perf_counter() - start) * 1e3, sent,
                           [[list(r) for r in pl.ranks] for pl in new], [list(pl.replicas) for pl in new])

    def _slot_tensors(self, layer, opt) -> list[torch.Tensor]:
        """The tensors with one row per slot: the three weights and their AdamW moments."""
        out = []
        for w in self._weights(layer):
            out.append(w.data)
            state = opt.state.get(w, {})
            for k in sorted(state):
                v = state[k]
                if torch.is_tensor(v) and v.shape == w.shape:
                    out.append(v)
        return out

    def _move(self, new: list[Placement], opt) -> int:
        """Every slot whose expert changes gets the expert's weights and AdamW moments from a
        holder under the old placement (this rank when it holds the expert): one layer at a time,
        one all-to-all over the EP group per layer and dtype, so the extra memory is the changed
        slots of one layer. Every rank computes the same plan. Returns the bytes this rank sent."""
        sent = 0
        for li, (old, nxt) in enumerate(zip(self.placements, new)):
            if nxt.ranks != old.ranks:
                sent += self._move_layer(li, old, nxt, opt)
        return sent

    def _move_layer(self, li: int, old: Placement, nxt: Placement, opt) -> int:
        ep, me = self.ep, self.ep_rank
        where = [{e: j for j, e in enumerate(held)} for held in old.ranks]
        # (src slot on src rank, dst slot on dst rank) per (src, dst), in dst-slot order; slots that
        # keep their expert are left alone
        plan: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for dst in range(ep):
            for j, e in enumerate(nxt.ranks[dst]):
                if where[dst].get(e) == j:
                    continue
                holders = [r for r in range(ep) if e in where[r]]
                src = dst if dst in holders else holders[dst % len(holders)]
                plan.setdefault((src, dst), []).append((where[src][e], j))
        tensors = self._slot_tensors(self.layers[li], opt)
        sent = 0
        for kind in sorted({(t.dtype, t.device) for t in tensors}, key=str):
            group = [t for t in tensors if (t.dtype, t.device) == kind]
            width = sum(t[0].numel() for t in group)

            def row(j):
                return torch.cat([t[j].reshape(-1) for t in group])

            arrived = {j_dst: row(j_src) for j_src, j_dst in plan.get((me, me), [])}   # copies: safe to overwrite after
            send = [[] if dst == me else [row(j) for j, _ in plan.get((me, dst), [])] for dst in range(ep)]
            recv = [[] if src == me else plan.get((src, me), []) for src in range(ep)]
            rows = [r for rs in send for r in rs]
            dtype, device = kind
            send_flat = torch.stack(rows) if rows else torch.empty(0, width, dtype=dtype, device=device)
            recv_flat = torch.empty(sum(map(len, recv)), width, dtype=dtype, device=device)
            dist.all_to_all_single(recv_flat, send_flat, [len(r) for r in recv], [len(s) for s in send],
                                   group=self.par.ep_group)
            sent += send_flat.numel() * send_flat.element_size()
            incoming = iter(recv_flat)
            for src in range(ep):
                for _, j_dst in recv[src]:
                    arrived[j_dst] = next(incoming)
            for j, flat in arrived.items():
                offset = 0
                for t in group:
                    t[j].copy_(flat[offset:offset + t[j].numel()].view_as(t[j]))
                    offset += t[j].numel()
        return sent

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """For the checkpoint manifest (JSON): the placement and the window's loads so far."""
        return {"version": _STATE_VERSION, "ep": self.ep, "redundant": self.R, "num_experts": self.E,
                "ranks": [[list(r) for r in pl.ranks] for pl in self.placements],
                "window": self._window_totals()}

    def _window_totals(self) -> list:
        """The window's kept copies per layer and expert, summed over the data-parallel group."""
        load = self.window.clone()
        if self.par.dims.dp > 1:
            dist.all_reduce(load, group=self.par.dp_group)
        return load.cpu().tolist()         # sync ok: per re-placement and per checkpoint save

    def restore(self, saved) -> Optional[str]:
        """Before the checkpoint's weights are loaded: take its placement when it was saved at this
        ep, redundancy and expert count (else keep the first placement). Returns a note line, or
        None. Raises ValueError for a malformed entry (a checkpoint is untrusted input)."""
        if saved is None:
            self._install([self.first] * len(self.layers), [[0] * self.E] * len(self.layers))
            return "note: the checkpoint has no expert placement: starting from the first placement"
        if not isinstance(saved, dict) or saved.get("version") != _STATE_VERSION:
            raise ValueError("its expert placement entry is not a version-1 placement")
        saved_at = tuple(_small_int(saved.get(k)) for k in ("ep", "redundant", "num_experts"))
        if saved_at != (self.ep, self.R, self.E):
            self._install([self.first] * len(self.layers), [[0] * self.E] * len(self.layers))
            return (f"note: the checkpoint's expert placement was for ep={saved_at[0]} with {saved_at[1]} "
                    f"redundant experts of {saved_at[2]}: starting from the first placement")
        ranks, window = saved.get("ranks"), saved.get("window")
        if not isinstance(ranks, list) or len(ranks) != len(self.layers) or not isinstance(window, list) \
                or len(window) != len(self.layers):
            raise ValueError(f"its expert placement does not have {len(self.layers)} MoE layers")
        placements = []
        for li, (r, w) in enumerate(zip(ranks, window)):
            why = check_ranks(r, self.E, self.ep, self.S)
            if why is None and not (isinstance(w, list) and len(w) == self.E
                                    and all(type(x) is int and 0 <= x < 2 ** 62 for x in w)):
                why = f"the window load is not {self.E} counts"
            if why:
                raise ValueError(f"its expert placement of MoE layer {li} is invalid: {why}")
            placements.append(load_under(r, [0.0] * self.E))
        self._install(placements, window)
        return None

    def _install(self, placements: list[Placement], window: list) -> None:
        """Adopt `placements` before a checkpoint load fills the slots by their new ids (nothing
        is moved). The window's loads so far go to the first data-parallel rank (sums count)."""
        self.placements = placements
        first = self.par.dp_rank == 0
        self.window.copy_(torch.tensor(window, dtype=torch.int64) * int(first))
        for layer, pl in zip(self.layers, placements):
            layer.experts.expert_ids = list(pl.ranks[self.ep_rank])
            self._route(layer, pl)


def _small_int(v) -> object:
    """A manifest value for a log line: a plain int as itself, anything else (untrusted: huge
    lists, strings with newlines) as '<invalid>'."""
    return v if type(v) is int and abs(v) < 2 ** 31 else "<invalid>"
