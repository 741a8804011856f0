"""The single-process oracle for layer tests: a copy of the full layer, one forward/backward."""
from __future__ import annotations

import copy


def reference_step(layer, x, gy):
    """Run a deep copy of `layer` (all experts, one process) on x with upstream gradient gy.

    Returns (y, x.grad, {param name: grad}, aux) of the copy; `layer` itself is untouched, so it
    can be sharded afterwards and compared against these values.
    """
    ref = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    y, aux = ref(x)
    (y * gy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in ref.named_parameters()}, aux
