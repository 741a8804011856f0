"""GroupedExperts: every grouped-matmul implementation equals one SwiGLU per slice, with the
counts on the host or only on the device (rows after the last expert's are ignored)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import grouped_mm_misfit
from moetrain.moe.experts import ExpertCounts, GroupedExperts, choose_impl
from moetrain.moe.grouped_swiglu import expert_ranges, grouped_swiglu

D, H, L = 8, 6, 4


def make_experts(impl, dtype=torch.float64, seed=0, hidden=H):
    spread = impl == "loop_spread"          # loop with experts spread over a thread pool
    ex = GroupedExperts(L, D, hidden, "loop" if spread else impl)
    ex.spread = True if spread else False
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ex.to(dtype)


def on_host(counts):
    return ExpertCounts(torch.tensor(counts), list(counts))


def per_slice_reference(ex, x_ND, counts):
    outs, start = [], 0
    for e, n in enumerate(counts):
        x = x_ND[start:start + n]
        outs.append((F.silu(x @ ex.w1[e]) * (x @ ex.w3[e])) @ ex.w2[e])
        start += n
    return torch.cat(outs, 0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", ["loop", "loop_spread", "bmm"])
@pytest.mark.parametrize("counts", [[3, 0, 2, 5], [0, 0, 0, 4], [1, 1, 1, 1], [0, 6, 0, 0]])
def test_grouped_experts_match_per_slice_swiglu(impl, counts, two_threads):
    ex = make_experts(impl)
    x = torch.randn(sum(counts), D, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    y = ex(x, on_host(counts))
    y_ref = per_slice_reference(ex, x, counts)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    G = torch.randn_like(y)
    got = torch.autograd.grad((y * G).sum(), [x, ex.w1, ex.w3, ex.w2])
    want = torch.autograd.grad((y_ref * G).sum(), [x, ex.w1, ex.w3, ex.w2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "loop_spread", "bmm", "grouped"])
def test_grouped_experts_no_rows_keeps_weights_in_graph(impl):
    """An EP rank that receives nothing still produces (zero) gradients for all its weights."""
    ex = make_experts(impl, hidden=8)       # grouped: 16-byte aligned rows
    dtype = torch.float32 if impl == "grouped" else torch.float64
    ex = ex.to(dtype)
    x = torch.zeros(0, D, dtype=dtype, requires_grad=True)
    y = ex(x, on_host([0] * L))
    assert y.shape == (0, D)
    y.sum().backward()
    for w in (ex.w1, ex.w3, ex.w2):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_spreading_experts_over_threads_is_bitwise_identical(two_threads):
    """Each expert is computed by one thread with the same kernels, however experts are spread."""
    torch.manual_seed(3)
    Lx, Dx, Hx = 12, 32, 48
    w = [torch.randn(Lx, Dx, Hx) * 0.1, torch.randn(Lx, Dx, Hx) * 0.1, torch.randn(Lx, Hx, Dx) * 0.1]
    counts = [5, 0, 17, 3, 0, 0, 40, 1, 9, 2, 0, 11]
    x = torch.randn(sum(counts), Dx)
    G = torch.randn(sum(counts), Dx)
    results = []
    for spread in (False, True):
        ws = [t.clone().requires_grad_(True) for t in w]
        xs = x.clone().requires_grad_(True)
        torch.set_num_threads(1 if not spread else 2)
        y = grouped_swiglu(xs, *ws, counts, spread=spread)
        (y * G).sum().backward()
        results.append([y.detach(), xs.grad] + [t.grad for t in ws])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("counts,parts", [([5, 0, 17, 3, 0, 40, 1], 2), ([1] * 9, 4), ([0, 0, 7], 3),
                                          ([3, 3], 8), ([100, 1, 1, 1], 2)])
def test_expert_ranges_cover_every_expert_once_in_order(counts, parts):
    ranges = expert_ranges(counts, parts)
    assert 1 <= len(ranges) <= parts
    assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
    for (a0, a1, r0), (b0, b1, _) in zip(ranges, ranges[1:]):
        assert a1 == b0 and a1 > a0
    for e0, e1, row0 in ranges:
        assert row0 == sum(counts[:e0])


def test_grouped_swiglu_rejects_counts_that_do_not_match_rows():
    w = torch.zeros(2, D, H)
    with pytest.raises(ValueError, match="counts sum to 3 but x has 4 rows"):
        grouped_swiglu(torch.zeros(4, D), w, w, w.transpose(1, 2), [1, 2])


def test_shard_keeps_a_slice_and_moves_the_offset():
    ex = make_experts("loop")
    full_w1 = ex.w1.detach().clone()
    ex.shard_(2, 2)
    assert ex.num_experts == 2 and ex.expert_offset == 2
    assert torch.equal(ex.w1, full_w1[2:4])
    ex.shard_(1, 1)                                 # nested: global expert 3
    assert ex.expert_offset == 3 and torch.equal(ex.w1, full_w1[3:4])


@pytest.mark.parametrize("counts", [[3, 0, 2, 5], [0, 0, 0, 4], [0, 6, 0, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("impl", ["grouped", "loop", "bmm"])
def test_device_counts_with_rows_past_the_last_expert(impl, counts, extra):
    """ExpertCounts without host counts (the sync-free dispatch): `extra` rows after the experts'
    rows hold NaN, must come back as zeros and get no gradient; the rest equals the reference.
    grouped runs torch's CPU _grouped_mm in fp32 (the GPU kernel is bf16-only)."""
    ex = make_experts(impl, dtype=torch.float32, hidden=8)
    n = sum(counts)
    x = torch.randn(n + extra, D, generator=torch.Generator().manual_seed(1))
    x[n:] = float("nan")
    x.requires_grad_(True)
    y = ex(x, ExpertCounts(torch.tensor(counts)))
    assert y.shape == (n + extra, D)
    assert torch.equal(y[n:], torch.zeros(extra, D))
    y_ref = per_slice_reference(ex, x[:n], counts) if n else x[:0] * 0
    torch.testing.assert_close(y[:n], y_ref, rtol=1e-5, atol=1e-6)
    G = torch.randn_like(y)
    got = torch.autograd.grad((y * G).sum(), [x, ex.w1, ex.w3, ex.w2], allow_unused=True)
    assert torch.equal(got[0][n:], torch.zeros(extra, D))
    if n:
        want = torch.autograd.grad((y_ref * G[:n]).sum(), [x, ex.w1, ex.w3, ex.w2])
        torch.testing.assert_close(got[0][:n], want[0][:n], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for e in range(L):                   # an expert with no rows gets an exact zero gradient
            if counts[e] == 0:
                assert all(torch.count_nonzero(g[e]) == 0 for g in got[1:])


def test_grouped_bf16_on_cpu_matches_loop():
    """The path GPUs run (bf16 weights and rows) against the loop path in the same dtype."""
    counts = [16, 0, 32, 48]
    ex = make_experts("loop", dtype=torch.bfloat16, hidden=16)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref = ex(x, on_host(counts))
    ex.impl = "grouped"
    got = ex(x, ExpertCounts(torch.tensor(counts)))
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_choose_impl_auto_rules():
    cpu = torch.device("cpu")
    assert choose_impl("auto", cpu, torch.float32, 64, 128)[0] == "loop"
    assert choose_impl("bmm", cpu, torch.float32, 64, 128) == ("bmm", "moe.grouped_mm=bmm")
    assert grouped_mm_misfit(64, 128) is None
    assert "expert hidden=100" in grouped_mm_misfit(64, 100)
    assert "dim=20" in grouped_mm_misfit(20, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_mm_matches_loop_on_cuda_bf16_with_backward_and_empty_experts(padded):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    dim, hidden = 64, 128                           # grouped_mm wants 16-byte aligned strides
    counts = [16, 0, 32, 48]
    ref = GroupedExperts(L, dim, hidden, "loop")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.05)
    ref = ref.cuda().to(torch.bfloat16)
    grouped = GroupedExperts(L, dim, hidden, "grouped").cuda().to(torch.bfloat16)
    grouped.load_state_dict(ref.state_dict())
    n = sum(counts)
    x = torch.randn(n + (5 if padded else 0), dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dev_counts = torch.tensor(counts, device="cuda")
    y = grouped(x, ExpertCounts(dev_counts, None if padded else counts))
    y_ref = ref(x[:n], ExpertCounts(dev_counts, counts))
    torch.testing.assert_close(y[:n].float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    if padded:
        assert torch.count_nonzero(y[n:]) == 0
    G = torch.randn_like(y)
    got = torch.autograd.grad((y.float() * G.float()).sum(), [x, grouped.w1, grouped.w3, grouped.w2])
    want = torch.autograd.grad((y_ref.float() * G[:n].float()).sum(), [ref.w1, ref.w3, ref.w2])
    for a, b in zip(got[1:], want):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
        assert torch.count_nonzero(a[1]) == 0          # expert 1 had no rows (pytorch#172439 on sm100)
    assert torch.isfinite(got[0]).all()
    if padded:
        assert torch.count_nonzero(got[0][n:]) == 0
