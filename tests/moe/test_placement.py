"""moetrain/moe/placement.py: the balanced placement of experts (and redundant replicas) on EP ranks,
by hand, against a brute-force optimum on small cases, and its invariants on random loads."""
from __future__ import annotations

import itertools
import random

import pytest

from moetrain.moe import placement as P


def _check_invariants(p: P.Placement, load, ep: int, redundant: int) -> None:
    E, S = len(load), (len(load) + redundant) // ep
    assert len(p.ranks) == ep and all(len(h) == S and len(set(h)) == S for h in p.ranks)
    assert sum(p.replicas) == E + redundant and min(p.replicas) >= 1 and max(p.replicas) <= ep
    assert sorted(x for h in p.ranks for x in h) == sorted(e for e, c in enumerate(p.replicas) for _ in range(c))
    for r, held in enumerate(p.ranks):                   # rank loads are the replicas' equal shares
        assert p.rank_load[r] == pytest.approx(sum(load[e] / p.replicas[e] for e in held))


def test_static_placement_is_contiguous_slices():
    p = P.static_placement([4, 3, 2, 1, 0, 0, 0, 0], 4)
    assert p.ranks == ((0, 1), (2, 3), (4, 5), (6, 7)) and p.rank_load == (7, 3, 0, 0)
    assert p.imbalance == pytest.approx(7 / 2.5) and p.holders(3) == [1]


def test_uniform_load_is_balanced_either_way():
    for ep in (1, 2, 4, 8):
        assert P.balanced_placement([5.0] * 8, ep).imbalance == pytest.approx(1.0)
        assert P.static_placement([5.0] * 8, ep).imbalance == pytest.approx(1.0)


def test_hot_expert_by_hand():
    """Expert 0 takes 7 of 14 tokens. Without replicas its rank carries 7 + a partner of 1 (2 slots
    per rank), the others 2 each. With 4 redundant replicas (3 slots per rank): expert 0 gets 3
    more (7, then 3.5 and 2.33 beat every other load of 1; at most one per rank), the fourth goes
    to expert 1 (ties: the lower id)."""
    load = [7, 1, 1, 1, 1, 1, 1, 1]
    static = P.static_placement(load, 4)
    assert max(static.rank_load) == 8
    p0 = P.balanced_placement(load, 4)
    assert max(p0.rank_load) == 8 and p0.holders(0) == [0] and p0.rank_load[1:] == (2, 2, 2)
    p4 = P.balanced_placement(load, 4, redundant=4)
    _check_invariants(p4, load, 4, 4)
    assert p4.replicas == (4, 2, 1, 1, 1, 1, 1, 1) and p4.holders(0) == [0, 1, 2, 3]
    assert max(p4.rank_load) == pytest.approx(3.75) == P.lower_bound(load, 4, p4.replicas) + 0.25
    assert p4.imbalance == pytest.approx(3.75 / 3.5)


def test_replica_counts_follow_the_largest_per_replica_load():
    assert P.replica_counts([9, 3, 3, 1], 2, 0) == [1, 1, 1, 1]
    assert P.replica_counts([9, 3, 3, 1], 2, 2) == [2, 2, 1, 1]      # e0 is capped at ep=2 replicas
    assert P.replica_counts([9, 3, 3, 1], 3, 2) == [3, 1, 1, 1]      # 9, then 4.5 > 3: e0 twice
    assert P.replica_counts([2, 2], 2, 2) == [2, 2]                  # ties: the lower id first


@pytest.mark.parametrize("ep,S", [(2, 2), (2, 3), (3, 2)])
def test_close_to_the_brute_force_optimum(ep, S):
    """For the replica counts step 1 chose, no assignment of replicas to ranks beats the greedy by
    more than 10% on these small random cases (LPT's classic bound is 4/3)."""
    rng = random.Random(ep * 10 + S)
    for _ in range(40):
        E = rng.randint(-(-ep * S // ep), ep * S)
        R = ep * S - E
        if R > E * (ep - 1):
            continue
        load = [rng.random() * 10 for _ in range(E)]
        p = P.balanced_placement(load, ep, R)
        items = [(load[e] / p.replicas[e], e) for e in range(E) for _ in range(p.replicas[e])]
        best = float("inf")
        for assign in itertools.product(range(ep), repeat=len(items)):
            held, rl = [set() for _ in range(ep)], [0.0] * ep
            if any(assign.count(r) != S for r in range(ep)):
                continue
            ok = True
            for (share, e), r in zip(items, assign):
                ok = ok and e not in held[r]
                held[r].add(e)
                rl[r] += share
            if ok:
                best = min(best, max(rl))
        assert max(p.rank_load) <= 1.10 * best + 1e-9


def test_invariants_on_random_loads_and_determinism():
    rng = random.Random(0)
    for _ in range(500):
        ep = rng.choice([1, 2, 3, 4, 8])
        S = rng.randint(1, 4)
        E = rng.randint(-(-ep * S // ep), ep * S)
        R = ep * S - E
        if R > E * (ep - 1):
            continue
        load = [rng.choice([0.0, 1.0, rng.random(), rng.random() * 100]) for _ in range(E)]
        p = P.balanced_placement(load, ep, R)
        _check_invariants(p, load, ep, R)
        assert p == P.balanced_placement(list(load), ep, R)
        assert max(p.rank_load) >= P.lower_bound(load, ep, p.replicas) - 1e-9


def test_zipf_skew_balanced_beats_static():
    """Zipf(1.2) loads over 16 experts on 4 ranks: the balanced placement's busiest rank carries
    less than the static one's, and 4 redundant replicas lower it further."""
    load = [1000 / (i + 1) ** 1.2 for i in range(16)]
    static = max(P.static_placement(load, 4).rank_load)
    bal = max(P.balanced_placement(load, 4).rank_load)
    rep = max(P.balanced_placement(load, 4, redundant=4).rank_load)
    assert rep < bal < static
    assert rep / (sum(load) / 4) < 1.15


def test_make_room_moves_an_expert_to_free_a_slot():
    """The repair step for a dead end: the ranks with a free slot (1, 2) both hold expert 0, so
    expert 1 moves from the full rank 0 to rank 1, and rank 0 takes the replica of expert 0."""
    held, load = [[1, 2], [0], [0]], [2.0, 1.0, 1.0]
    r = P._make_room(held, load, [1.0, 1.0, 1.0], 0, 2)
    assert r == 0 and held == [[2], [0, 1], [0]] and load == [1.0, 2.0, 1.0]


@pytest.mark.parametrize("load,ep,R,msg", [
    ([], 2, 0, "at least one expert"),
    ([1, 2, 3], 2, 0, "fill ep=2 ranks evenly"),
    ([1, float("nan")], 2, 0, "finite numbers"),
    ([1, -1], 2, 0, "finite numbers"),
    ([1, 2], 2, 4, "exceed"),
])
def test_bad_arguments(load, ep, R, msg):
    with pytest.raises(ValueError, match=msg):
        P.balanced_placement(load, ep, R)
