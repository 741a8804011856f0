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


# ---------------------------------------------------------------- what training reads from a placement


def test_slots_and_primary_replicas():
    p = P.balanced_placement([10, 1, 1, 1, 5, 1, 1, 1], 4, 4)
    assert p.ranks == ((0, 4, 6), (0, 4, 7), (0, 1, 3), (0, 2, 5))
    # slot id = rank * 3 + index in the rank's sorted experts
    assert p.slots()[0] == [0, 3, 6, 9] and p.slots()[4] == [1, 4] and p.slots()[7] == [5]
    assert p.primary(0) == [True, True, True] and p.primary(1) == [False, False, True]
    assert sum(sum(p.primary(r)) for r in range(4)) == 8          # each expert counted once


def test_load_under_an_older_placement():
    p = P.balanced_placement([10, 1, 1, 1, 5, 1, 1, 1], 4, 4)
    q = P.load_under(p.ranks, [1.0] * 8)
    assert q.ranks == p.ranks and q.replicas == p.replicas
    assert q.rank_load[0] == pytest.approx(1 / 4 + 1 / 2 + 1)


@pytest.mark.parametrize("ranks,why", [
    ([[0, 1], [2, 3]], None),
    ([[0, 1], [2]], "rank 1 must hold 2"),
    ([[0, 1]], "expected 2 ranks"),
    ([[1, 0], [2, 3]], "not distinct and sorted"),
    ([[0, 0], [2, 3]], "not distinct and sorted"),
    ([[0, 1], [2, 4]], "outside 0..3"),
    ([[0, 1], [1, 2]], "have no replica"),
    ([[0, True], [2, 3]], "outside"),
    ("0,1,2,3", "expected 2 ranks"),
])
def test_check_ranks(ranks, why):
    got = P.check_ranks(ranks, 4, 2, 2)
    assert (got is None) if why is None else (why in got), got


def _to_replicas(idx, kept, p: P.Placement, salt: int):
    import torch
    from moetrain.moe.permute import to_replicas
    slots = p.slots()
    width = max(map(len, slots))
    table = torch.tensor([s + s[:1] * (width - len(s)) for s in slots])
    return to_replicas(torch.tensor(idx), torch.tensor(kept), table, torch.tensor(p.replicas), salt)


def test_to_replicas_splits_each_experts_copies_evenly():
    import torch
    p = P.balanced_placement([10, 1, 1, 1, 5, 1, 1, 1], 4, 4)          # expert 0 on all 4 ranks, 4 on 2
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (37, 2), generator=gen)
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 8, idx[:, 1])
    kept = torch.rand(37, 2, generator=gen) > 0.2
    for salt in range(4):
        slot = _to_replicas(idx.tolist(), kept.tolist(), p, salt)
        S = 3
        for e in range(8):
            mine = slot[kept & (idx == e)]
            assert all(p.ranks[int(s) // S][int(s) % S] == e for s in mine)    # a replica of e
            per_replica = torch.tensor([(mine == s).sum() for s in p.slots()[e]])
            assert int(per_replica.max() - per_replica.min()) <= 1, (e, per_replica)
    # the salt (the source's EP rank) starts the round at another replica
    one = [[0, 1]]
    assert {int(_to_replicas(one, [[True, True]], p, s)[0, 0]) for s in range(4)} == set(p.slots()[0])


def test_to_replicas_without_replicas_is_the_expert_slot():
    import torch
    p = P.static_placement([1.0] * 8, 2)
    idx = torch.tensor([[3, 5], [7, 0]])
    got = _to_replicas(idx.tolist(), [[True, True], [True, False]], p, 1)
    assert got.tolist() == [[3, 5], [7, 0]]


@pytest.mark.parametrize("over,msg", [
    (["moe.redundant_experts=2"], "needs moe.placement=balanced"),
    (["moe.placement=balanced", "moe.redundant_experts=1"], "fill parallel.ep=2 ranks evenly"),
    (["moe.placement=balanced", "moe.redundant_experts=10"], "at most 8"),
    (["moe.placement=balanced", "moe.redundant_experts=-2"], "must be >= 0"),
    (["moe.placement=balanced", "moe.rebalance_every=0"], "must be >= 1"),
    (["moe.placement=greedy"], "one of static, balanced"),
    (["moe.placement=balanced", "parallel.fsdp=true"], "parallel.fsdp"),
    (["moe.placement=balanced", "parallel.etp=true", "parallel.tp=2"], "parallel.etp"),
    (["moe.placement=balanced", "moe.layer=peer"], "routed FFN experts"),
])
def test_placement_config_errors_are_one_line(over, msg):
    from moetrain.config import ConfigError, load_config, validate_layout
    with pytest.raises(ConfigError) as info:
        cfg = load_config("configs/tiny_cpu.yaml", ["parallel.ep=2", "train.device=cpu"] + over)
        validate_layout(cfg, 4 if "parallel.tp=2" in over else 2)
    assert msg in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_balanced_config_accepts_uneven_expert_counts():
    """6 experts + 2 redundant fill ep=4 (6 % 4 != 0 is fine under balanced)."""
    from moetrain.config import load_config, validate_layout
    cfg = load_config("configs/tiny_cpu.yaml", ["moe.num_experts=6", "parallel.ep=4", "moe.placement=balanced",
                                                "moe.redundant_experts=2", "train.device=cpu"])
    assert validate_layout(cfg, 4)[2] == 4
