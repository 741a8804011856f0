"""Index math of moetrain.moe.permute on hand-worked examples, plus random round-trip properties."""
from __future__ import annotations

import pytest
import torch

from moetrain.moe.permute import (gather_rows, invert_permutation, permute_rows, rank_splits, regroup_by_expert,
                                  sort_by_expert)

T_, F_ = True, False


# --------------------------------------------------------------------------- sort_by_expert

def test_sort_by_expert_hand_example():
    # T=4, K=2, E=4 (expert 3 gets nothing). Flattened copy index c = t*K + k:
    #   c0 (t0,e0)  c1 (t0,e1)  c2 (t1,e0)  c3 (t1,e2)  c4 (t2,e1)  c5 (t2,e0) dropped
    #   c6 (t3,e0) dropped  c7 (t3,e1) dropped
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    kept = torch.tensor([[T_, T_], [T_, T_], [T_, F_], [F_, F_]])
    token_idx, copy_idx, counts = sort_by_expert(idx, kept, 4)
    # e0: c0, c2 | e1: c1, c4 | e2: c3 | e3: - | then the dropped copies c5, c6, c7 in order
    assert copy_idx.tolist() == [0, 2, 1, 4, 3, 5, 6, 7]
    assert token_idx.tolist() == [0, 1, 0, 2, 1, 2, 3, 3]
    assert counts.tolist() == [2, 2, 1, 0]


def test_sort_by_expert_stable_within_expert():
    # top-1, every token to e1 except t2 (e0) and t4 (dropped): e1 keeps token order 0, 1, 3, 5
    idx = torch.tensor([[1], [1], [0], [1], [1], [1]])
    kept = torch.tensor([[T_], [T_], [T_], [T_], [F_], [T_]])
    token_idx, copy_idx, counts = sort_by_expert(idx, kept, 3)
    assert token_idx.tolist() == [2, 0, 1, 3, 5, 4]
    assert copy_idx.tolist() == [2, 0, 1, 3, 5, 4]
    assert counts.tolist() == [1, 4, 0]


def test_sort_by_expert_nothing_kept():
    idx = torch.tensor([[0, 1], [1, 0]])
    token_idx, copy_idx, counts = sort_by_expert(idx, torch.zeros(2, 2, dtype=torch.bool), 2)
    assert copy_idx.tolist() == [0, 1, 2, 3] and token_idx.tolist() == [0, 0, 1, 1]    # all dropped
    assert counts.tolist() == [0, 0]


def test_rank_splits():
    counts_E = torch.tensor([2, 0, 1, 3, 0, 0])
    assert rank_splits(counts_E, 2).tolist() == [3, 3]
    assert rank_splits(counts_E, 3).tolist() == [2, 4, 0]
    assert rank_splits(counts_E, 1).tolist() == [6]


@pytest.mark.parametrize("seed", range(6))
def test_sort_by_expert_random_properties(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = 37, 6
    K = 1 + seed % 3
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])   # distinct per token
    kept = torch.rand(T, K, generator=g) < 0.7
    token_idx, copy_idx, counts = sort_by_expert(idx, kept, E)
    flat = idx.reshape(-1)
    # every copy once; the kept ones first, then the dropped ones in copy order
    assert sorted(copy_idx.tolist()) == list(range(T * K))
    N = int(counts.sum())
    assert copy_idx[N:].tolist() == torch.nonzero(~kept.reshape(-1)).view(-1).tolist()
    token_idx, copy_idx = token_idx[:N], copy_idx[:N]
    assert sorted(copy_idx.tolist()) == torch.nonzero(kept.reshape(-1)).view(-1).tolist()
    assert torch.equal(token_idx, copy_idx // K)
    assert torch.equal(counts, torch.bincount(flat[kept.reshape(-1)], minlength=E))
    # grouped by expert, contiguous slices of the given lengths, token order inside a slice
    experts = flat[copy_idx]
    assert torch.all(experts[1:] >= experts[:-1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        sl = slice(start, start + n)
        assert torch.all(experts[sl] == e)
        assert torch.all(token_idx[sl][1:] > token_idx[sl][:-1])
        start += n
    # gather + scatter-add of the sorted rows reproduces sum over kept copies of x[t]
    x = torch.randn(T, 3, generator=g, dtype=torch.float64)
    back = torch.zeros_like(x).index_add(0, token_idx, x[token_idx])
    torch.testing.assert_close(back, x * kept.sum(1, keepdim=True).to(x.dtype))


# --------------------------------------------------------------------------- regroup / invert

def test_regroup_by_expert_hand_example_with_zero_blocks():
    # R=2 source ranks, L=3 local experts; blocks (r0,l1) and (r1,l2) are empty.
    # received rows, r-major: r0l0 -> 0,1 | r0l1 -> - | r0l2 -> 2 | r1l0 -> 3 | r1l1 -> 4,5 | r1l2 -> -
    # l-major (expert, then source rank): l0 -> 0,1,3 | l1 -> 4,5 | l2 -> 2
    counts_RL = torch.tensor([[2, 0, 1], [1, 2, 0]])
    perm = regroup_by_expert(counts_RL, int(counts_RL.sum()))
    assert perm.tolist() == [0, 1, 3, 4, 5, 2]
    inv = invert_permutation(perm)
    # inv[perm[i]] = i
    assert inv.tolist() == [0, 1, 5, 2, 3, 4]
    recv = torch.tensor([10., 11., 12., 13., 14., 15.])
    assert recv[perm].tolist() == [10., 11., 13., 14., 15., 12.]
    assert torch.equal(recv[perm][inv], recv)


def test_regroup_by_expert_single_rank_is_identity_and_empty_is_empty():
    assert regroup_by_expert(torch.tensor([[2, 0, 3]]), 5).tolist() == [0, 1, 2, 3, 4]
    assert regroup_by_expert(torch.tensor([[1], [2]]), 3).tolist() == [0, 1, 2]   # L=1: already grouped
    assert regroup_by_expert(torch.zeros(2, 3, dtype=torch.long), 0).numel() == 0


def test_invert_permutation_hand_example():
    perm = torch.tensor([2, 0, 3, 1])
    inv = invert_permutation(perm)
    assert inv.tolist() == [1, 3, 0, 2]
    assert invert_permutation(torch.tensor([], dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("seed", range(8))
def test_regroup_random_round_trip(seed):
    g = torch.Generator().manual_seed(100 + seed)
    R, L = 1 + seed % 4, 1 + (seed * 7) % 5
    counts_RL = torch.randint(0, 4, (R, L), generator=g)
    counts_RL[torch.rand(R, L, generator=g) < 0.3] = 0                 # plenty of empty blocks
    M = int(counts_RL.sum())
    recv = torch.randn(M, 2, generator=g)
    perm = regroup_by_expert(counts_RL, int(counts_RL.sum()))
    inv = invert_permutation(perm)
    assert sorted(perm.tolist()) == list(range(M))
    assert torch.equal(recv[perm][inv], recv)
    assert torch.equal(perm[inv], torch.arange(M)) and torch.equal(inv[perm], torch.arange(M))
    # expected l-major layout built block by block in plain Python
    starts = {}
    pos = 0
    for r in range(R):
        for l in range(L):
            starts[r, l] = pos
            pos += int(counts_RL[r, l])
    expected_rows = [starts[r, l] + i for l in range(L) for r in range(R) for i in range(int(counts_RL[r, l]))]
    assert perm.tolist() == expected_rows


@pytest.mark.parametrize("shape", [(6, 3), (6,)])
def test_gather_rows_matches_indexing_with_repeats_and_unused_rows(shape):
    """Forward equals src[idx]; backward sums the gradient of every repeat of a row and leaves
    rows never gathered at zero (the index_add_ backward must agree with autograd's own)."""
    torch.manual_seed(0)
    idx = torch.tensor([4, 0, 4, 2, 4, 0])          # row 4 three times, rows 1, 3, 5 never
    src = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref_src = src.detach().clone().requires_grad_(True)
    out, ref = gather_rows(src, idx), ref_src[idx]
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(src.grad, ref_src.grad)
    assert torch.equal(src.grad[torch.tensor([1, 3, 5])], torch.zeros_like(src.grad[:3]))
    want4 = g[0] + g[2] + g[4]
    assert torch.allclose(src.grad[4], want4)


def test_gather_rows_empty_index_and_gradcheck():
    src = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    empty = gather_rows(src, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 2)
    empty.sum().backward()
    assert torch.equal(src.grad, torch.zeros(5, 2, dtype=torch.float64))
    idx = torch.tensor([3, 3, 1, 0])
    assert torch.autograd.gradcheck(lambda s: gather_rows(s, idx), (src,))


def test_permute_rows_forward_and_backward_match_indexing():
    torch.manual_seed(1)
    perm = torch.randperm(7)
    src = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    ref_src = src.detach().clone().requires_grad_(True)
    out, ref = permute_rows(src, perm, invert_permutation(perm)), ref_src[perm]
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(src.grad, ref_src.grad)
