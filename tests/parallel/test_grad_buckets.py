"""BucketedAllReduce: gradients summed over a group in buckets launched during the backward of
the last micro-step; the result equals one flat all-reduce after it."""
from __future__ import annotations

import torch
import torch.nn as nn

from _dist import run_dist
from moetrain.parallel.grads import BucketedAllReduce


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3),
                         nn.Linear(3, 3))     # the last layer is never used: no gradient


def _grads(rank, bucket_bytes, micro_steps):
    """Two micro-steps of accumulation on this rank's data, then the summed gradients."""
    import torch.distributed as dist
    model = _model(0)
    params = list(model.parameters())
    reducer = BucketedAllReduce(params, dist.group.WORLD, bucket_bytes)
    g = torch.Generator().manual_seed(100 + rank)
    launched_during_backward = 0
    for m in range(micro_steps):
        if m == micro_steps - 1:
            reducer.arm()
        x = torch.randn(5, 6, generator=g)
        model[:5](x).square().sum().backward()
        launched_during_backward = reducer._next
    reducer.finish()
    return [p.grad.clone() if p.grad is not None else None for p in params], launched_during_backward, \
        len(reducer.buckets)


def _body(rank, world):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    out = {}
    for name, bucket_bytes in (("flat", 0), ("per_param", 1), ("small", 300)):
        out[name] = _grads(rank, bucket_bytes, micro_steps=2)
    return out


def test_bucketed_equals_flat_and_launches_during_backward():
    r0, r1 = run_dist(_body, 2, ())
    flat, per_param, small = r0["flat"], r0["per_param"], r0["small"]
    for got in (per_param[0], small[0], r1["per_param"][0]):
        for a, b in zip(got, flat[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the unused layer's parameters come back as zeros, summed like the rest
    assert torch.count_nonzero(flat[0][-1]) == 0 and torch.count_nonzero(flat[0][-2]) == 0
    # flat: nothing before finish(); one bucket per parameter: every bucket before the unused
    # layer's (launched in bucket order = reverse parameter order, so those come first) waits
    assert flat[1] == 0 and flat[2] == 1
    n_params = 8
    assert per_param[2] == n_params
    assert per_param[1] == 0         # the unused layer's buckets come first in reverse order: all wait


def _body_used_last(rank, world):
    """Unused parameters registered first (they sort last): the used buckets launch in backward."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    unused, used = nn.Linear(3, 3), nn.Linear(4, 4)
    params = list(unused.parameters()) + list(used.parameters())
    reducer = BucketedAllReduce(params, dist.group.WORLD, 1)
    reducer.arm()
    used(torch.full((2, 4), float(rank + 1))).sum().backward()
    during = reducer._next
    reducer.finish()
    return during, [p.grad.clone() for p in params]


def test_buckets_whose_parameters_are_ready_launch_during_backward():
    (during0, g0), (during1, g1) = run_dist(_body_used_last, 2, ())
    assert during0 == during1 == 2             # used.bias and used.weight, before finish()
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    assert torch.equal(g0[2], torch.full((4, 4), 2.0 + 4.0))     # sum over ranks of x = rank + 1, 2 rows
