"""Expert placement from measured load: which global experts each EP rank holds, with redundant
replicas of the hottest ones, so that the busiest rank's load is as low as possible.

Pure math (no torch, no collectives): the first piece of issue 19 (`moe.placement: balanced`).
Routing does not change with a placement: a token still chooses global expert e, and a copy for e
goes to one of e's replicas, each of which is assumed to take an equal share of e's load.

Given the per-expert load L_e of the last window (tokens routed to e), `ep` ranks with
S = (E + R) / ep slots each, and R redundant replicas in all:

1. Replicate (as DeepSeek's expert-parallel load balancer, EPLB): R times, give one more replica
   to the expert with the largest per-replica load L_e / c_e (ties: the lower id). An expert has at
   most `ep` replicas (two replicas on one rank would not spread anything).
2. Pack (longest processing time first, with slot counts): the E + R replicas, heaviest first
   (ties: lower expert id, then lower replica index), each go to the rank with the least load so
   far that has a free slot and no replica of that expert (ties: the lower rank).

The result is deterministic: every rank computes the same placement from the same (all-reduced)
loads. LPT is within 4/3 of the best packing of the replicas chosen in step 1 (Graham 1969, for
the uncapacitated case); `lower_bound` gives max(max_e L_e / c_e, sum L / ep) to compare with.

Shape legend: E experts, R redundant replicas, S slots per rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Placement:
    """ranks[r] = the global expert ids rank r holds, one per slot, sorted (each id at most once per
    rank); replicas[e] = how many ranks hold expert e; rank_load[r] = the load rank r receives when
    every replica takes an equal share of its expert's load."""
    ranks: tuple[tuple[int, ...], ...]
    replicas: tuple[int, ...]
    rank_load: tuple[float, ...]

    @property
    def imbalance(self) -> float:
        """max / mean rank load (1.0 = even); 1.0 when nothing is routed."""
        mean = sum(self.rank_load) / len(self.rank_load)
        return max(self.rank_load) / mean if mean > 0 else 1.0

    def holders(self, expert: int) -> list[int]:
        """The ranks that hold a replica of `expert`, in rank order."""
        return [r for r, held in enumerate(self.ranks) if expert in held]

    def slots(self) -> list[list[int]]:
        """slots[e] = the global slot ids (rank * S + index in ranks[rank]) of expert e's replicas,
        in rank order: the dispatcher's table (moe/permute.to_replicas)."""
        S = len(self.ranks[0])
        out: list[list[int]] = [[] for _ in self.replicas]
        for r, held in enumerate(self.ranks):
            for j, e in enumerate(held):
                out[e].append(r * S + j)
        return out

    def primary(self, rank: int) -> list[bool]:
        """Per slot of `rank`: whether it is its expert's first replica (the one that counts it in
        the gradient norm and writes it to checkpoints)."""
        return [self.holders(e)[0] == rank for e in self.ranks[rank]]


def load_under(placement_ranks: Sequence[Sequence[int]], load_E: Sequence[float]) -> Placement:
    """The Placement that holds `placement_ranks` (one tuple of expert ids per rank), with each rank's
    load when every replica takes an equal share of its expert's load: what a placement chosen from
    an older window makes of the newest one."""
    replicas = [0] * len(load_E)
    for held in placement_ranks:
        for e in held:
            replicas[e] += 1
    ranks = tuple(tuple(sorted(h)) for h in placement_ranks)
    return Placement(ranks, tuple(replicas),
                     tuple(float(sum(load_E[e] / replicas[e] for e in held)) for held in ranks))


def check_ranks(ranks, num_experts: int, ep: int, slots: int) -> Optional[str]:
    """Why `ranks` (e.g. read from a checkpoint's manifest) is not a valid placement of
    `num_experts` experts on `ep` ranks of `slots` slots each, or None."""
    if not isinstance(ranks, (list, tuple)) or len(ranks) != ep:
        return f"expected {ep} ranks"
    seen = set()
    for r, held in enumerate(ranks):
        if not isinstance(held, (list, tuple)) or len(held) != slots:
            return f"rank {r} must hold {slots} experts"
        if not all(type(e) is int and 0 <= e < num_experts for e in held):
            return f"rank {r} holds an id outside 0..{num_experts - 1}"
        if len(set(held)) != len(held) or list(held) != sorted(held):
            return f"rank {r}'s experts are not distinct and sorted"
        seen.update(held)
    if len(seen) != num_experts:
        return f"experts {sorted(set(range(num_experts)) - seen)[:5]} have no replica"
    return None


def _check(load_E: Sequence[float], ep: int, redundant: int) -> int:
    E = len(load_E)
    if E < 1 or ep < 1:
        raise ValueError(f"need at least one expert and one rank, got {E} experts and ep={ep}")
    if redundant < 0 or (E + redundant) % ep:
        raise ValueError(f"{E} experts + {redundant} redundant replicas must fill ep={ep} ranks evenly")
    if any(not (x >= 0) for x in load_E):           # also refuses nan
        raise ValueError("expert loads must be finite numbers >= 0")
    if redundant > E * (ep - 1):
        raise ValueError(f"{redundant} redundant replicas exceed what {E} experts on {ep} ranks can hold "
                         f"(each expert at most once per rank)")
    return (E + redundant) // ep


def static_placement(load_E: Sequence[float], ep: int) -> Placement:
    """Today's placement: rank r holds the contiguous experts [r*E/ep, (r+1)*E/ep), one replica each."""
    S = _check(load_E, ep, 0)
    ranks = tuple(tuple(range(r * S, (r + 1) * S)) for r in range(ep))
    return Placement(ranks, (1,) * len(load_E), tuple(float(sum(load_E[e] for e in held)) for held in ranks))


def replica_counts(load_E: Sequence[float], ep: int, redundant: int) -> list[int]:
    """Step 1: replicas per expert (sum = E + redundant), most to the largest per-replica load."""
    _check(load_E, ep, redundant)
    counts = [1] * len(load_E)
    for _ in range(redundant):
        best = max((e for e in range(len(load_E)) if counts[e] < ep),
                   key=lambda e: (load_E[e] / counts[e], -e))
        counts[best] += 1
    return counts


def balanced_placement(load_E: Sequence[float], ep: int, redundant: int = 0) -> Placement:
    """Steps 1 and 2 of the module docstring: the placement with up to `redundant` extra replicas
    that keeps the busiest rank's load low."""
    S = _check(load_E, ep, redundant)
    counts = replica_counts(load_E, ep, redundant)
    items = sorted(((load_E[e] / counts[e], e, j) for e in range(len(load_E)) for j in range(counts[e])),
                   key=lambda t: (-t[0], t[1], t[2]))
    held: list[list[int]] = [[] for _ in range(ep)]
    load = [0.0] * ep
    share_of = [x / c for x, c in zip(load_E, counts)]
    for share, e, _ in items:
        free = [r for r in range(ep) if len(held[r]) < S and e not in held[r]]
        if not free:
            free = [_make_room(held, load, share_of, e, S)]
        r = min(free, key=lambda r: (load[r], r))
        held[r].append(e)
        load[r] += share
    return Placement(tuple(tuple(sorted(h)) for h in held), tuple(counts), tuple(load))


def _make_room(held: list[list[int]], load: list[float], share_of: list[float], e: int, S: int) -> int:
    """Every rank with a free slot already holds e: move one expert e2 from a full rank r3 without e
    to such a rank r2 (e2 is not on r2: r2 holds fewer than S distinct ids, r3 exactly S), freeing a
    slot for e on r3. Both exist because e has fewer replicas than ranks and the slots add up."""
    r2 = next(r for r in range(len(held)) if len(held[r]) < S)
    r3 = next(r for r in range(len(held)) if e not in held[r])
    e2 = next(x for x in held[r3] if x not in held[r2])
    held[r3].remove(e2)
    held[r2].append(e2)
    load[r3] -= share_of[e2]
    load[r2] += share_of[e2]
    return r3


def lower_bound(load_E: Sequence[float], ep: int, replicas: Sequence[int]) -> float:
    """No placement with these replica counts has a busiest rank below this."""
    return max(max(x / c for x, c in zip(load_E, replicas)), sum(load_E) / ep)
