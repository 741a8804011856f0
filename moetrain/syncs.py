"""Count the operations that make the host wait for a GPU (host syncs), on any device.

A GPU runs ahead of the Python thread that feeds it; an op whose result the host must read
(`.item()`, `float(t)`, `bool(t)`, `.tolist()`, a copy to host memory) or whose output shape
depends on data (`nonzero`, boolean-mask indexing, `bincount`, `unique`, `repeat_interleave`
without `output_size`) stalls that thread until the GPU catches up, and the GPU then idles while
the host launches the next kernels. `SyncCounter` is a TorchDispatchMode that sees every aten op
and counts these by name, so a CPU run shows which syncs a GPU run would pay (a `.cpu()` of a CPU
tensor is invisible on CPU: tests run the model on the meta device too, where any sync raises).
Blocking host-to-device copies (`x.to(cuda)` from pageable memory) count on a GPU run; a
`torch.tensor(data, device=...)` never reaches a dispatch mode and must be caught by reading.

    with SyncCounter() as c:
        trainer.compute_gradients(step)
    c.total, c.by_op                      # e.g. 2, {"to_host": 2}
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that always need the device's result on the host
_ALWAYS = {
    aten._local_scalar_dense.default: "item",          # .item(), float(t), int(t), bool(t)
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",                 # CUDA reads the max id to size its output
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim.default: "unique",
}


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


def classify(func, args, kwargs) -> str | None:
    """The sync an aten call forces on a GPU, or None."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        return "bool_index" if _is_bool_index(args[1]) else None
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return "repeat_interleave" if kwargs.get("output_size") is None else None
    if func is aten._to_copy.default:
        dev = kwargs.get("device")
        if dev is None:
            return None
        if torch.device(dev).type == "cpu":
            return "to_host"                  # .to("cpu", ...) of a device tensor (or an explicit copy)
        if args[0].device.type == "cpu" and not kwargs.get("non_blocking", False):
            return "blocking_to_device"       # a pageable host->device copy waits for the stream
        return None
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        if dst.device.type == "cpu" and src.device.type != "cpu":
            return "to_host"
        if src.device.type == "cpu" and dst.device.type != "cpu" and not (len(args) > 2 and args[2]):
            return "blocking_to_device"
    return None


class SyncCounter(TorchDispatchMode):
    """Counts host-sync ops (see `classify`) while active; `by_op` maps kind -> count."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = classify(func, args, kwargs)
        if kind is not None:
            self.by_op[kind] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())
