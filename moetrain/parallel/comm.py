"""All-to-all with uneven splits, differentiable in both directions, timed.

The process group is always an argument. Timing goes into a `CommTimer` owned by the caller
(the dispatch metadata), never into module or global state: forward records land when the
collective completes, backward records land during `loss.backward()`, and the caller reads the
timer after backward.

Timing: on CPU the wall clock around the completed collective; on CUDA a pair of events, resolved
lazily (`CommTimer.totals`) so timing never adds a device sync to a step. An asynchronous
collective is timed to its own completion (a completion callback on CPU, an event on a side
stream on CUDA), so the work overlapped with it (the shared experts) is not counted as
communication.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function  # "moe/a2a/<phase>" labels for tools/profile_step.py


@dataclass
class CommTimer:
    """Accumulates (phase -> ms, bytes) for collectives launched by one layer in one micro-step.

    A record's end is a float (CPU wall clock), a CUDA event, or a torch Future whose value is
    the wall-clock time the collective completed (asynchronous CPU collectives)."""
    records: list = field(default_factory=list)   # (phase, start, end, nbytes)

    def start(self, device: torch.device):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, phase: str, start, device: torch.device, nbytes: int) -> None:
        """After a blocking collective returned (on CUDA: after it was enqueued; the event on the
        current stream completes when the stream has waited for it)."""
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.records.append((phase, start, end, nbytes))

    @staticmethod
    def track(work, device: torch.device):
        """Call right after launching an asynchronous collective. On CPU: a future that holds the
        wall-clock time of its completion (gloo runs it in its own thread), so the time of the
        work overlapped with it on this thread is not counted. On CUDA nothing (see stop_async)."""
        if device.type == "cuda":
            return None
        return work.get_future().then(lambda _: time.perf_counter())

    def stop_async(self, phase: str, start, device: torch.device, nbytes: int, work, tracked) -> None:
        """Record the end of an asynchronous collective: its own completion, not the caller's
        wait. On CUDA an event on a side stream that waits for the collective alone (the compute
        stream is busy with the overlapped work)."""
        if device.type == "cuda":
            side = _timing_stream(device)
            with torch.cuda.stream(side):
                work.wait()
                end = torch.cuda.Event(enable_timing=True)
                end.record()
        else:
            end = tracked
        self.records.append((phase, start, end, nbytes))

    def totals(self) -> dict[str, tuple[float, int]]:
        """phase -> (milliseconds, bytes). Resolving CUDA events synchronizes on them only."""
        out: dict[str, list] = {}
        for phase, start, end, nbytes in self.records:
            if isinstance(end, float):
                ms = (end - start) * 1e3
            elif isinstance(end, torch._C.Future):       # what Future.then returns
                ms = (end.wait() - start) * 1e3
            else:
                end.synchronize()
                ms = start.elapsed_time(end)
            acc = out.setdefault(phase, [0.0, 0])
            acc[0] += ms
            acc[1] += nbytes
        return {k: (v[0], v[1]) for k, v in out.items()}


_TIMING_STREAMS: dict = {}


def _timing_stream(device: torch.device):
    if device not in _TIMING_STREAMS:
        _TIMING_STREAMS[device] = torch.cuda.Stream(device=device)
    return _TIMING_STREAMS[device]


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in host memory. On a GPU this is a device-to-host copy that blocks until the
    device has produced t: call it only at the documented sync points (the split exchange)."""
    return t.to("cpu", copy=True)


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """Small all-to-all of int64 counts: send_counts[r, ...] goes to rank r. Same shape back."""
    recv = torch.empty_like(send_counts)
    with record_function("moe/a2a/counts"):
        dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
         timer: Optional[CommTimer], phase: str) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    start = timer.start(x.device) if timer is not None else None
    with record_function(f"moe/a2a/{phase}"):
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if timer is not None:
        timer.stop(phase, start, x.device, x.element_size() * x.numel())
    return out


class _AllToAll(torch.autograd.Function):
    """y = all_to_all(x); dy -> all_to_all back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer, phase):
        ctx.meta = (out_splits, in_splits, group, timer, phase)
        return _a2a(x, out_splits, in_splits, group, timer, phase)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, timer, phase = ctx.meta
        return _a2a(grad, in_splits, out_splits, group, timer, phase + "_bwd"), None, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
               timer: Optional[CommTimer] = None, phase: str = "a2a") -> torch.Tensor:
    """Differentiable uneven all-to-all over the rows of x (in_splits rows to each rank)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, timer, phase)


@dataclass
class PendingAllToAll:
    """An all-to-all launched asynchronously; `wait(x)` returns its differentiable output.

    Launching outside autograd and attaching the gradient at `wait` lets the caller run other
    autograd work (shared experts, the local share) while the collective is in flight.
    """
    out: torch.Tensor
    work: object
    out_splits: list
    in_splits: list
    group: object
    timer: Optional[CommTimer]
    phase: str
    start: object
    nbytes: int
    tracked: object = None

    def wait(self, x: torch.Tensor) -> torch.Tensor:
        return _WaitAllToAll.apply(x, self)


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending: PendingAllToAll):
        if pending.timer is not None:
            pending.timer.stop_async(pending.phase, pending.start, x.device, pending.nbytes, pending.work,
                                     pending.tracked)
        with record_function(f"moe/a2a/{pending.phase}_wait"):
            pending.work.wait()
        ctx.meta = (pending.out_splits, pending.in_splits, pending.group, pending.timer, pending.phase)
        return pending.out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, timer, phase = ctx.meta
        return _a2a(grad, in_splits, out_splits, group, timer, phase + "_bwd"), None


def all_to_all_start(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                     timer: Optional[CommTimer] = None, phase: str = "a2a") -> PendingAllToAll:
    """Launch the all-to-all of x (detached) and return immediately; finish with `.wait(x)`.

    On CUDA the collective runs on the backend's own stream, ordered after the current stream's
    pending work; `work.wait()` makes the current stream wait for it, so nothing here blocks the
    host and the caller's kernels overlap the transfer.
    """
    send = x.detach().contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    start = timer.start(x.device) if timer is not None else None
    with record_function(f"moe/a2a/{phase}"):
        work = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=True)
    tracked = CommTimer.track(work, x.device) if timer is not None else None
    return PendingAllToAll(out, work, out_splits, in_splits, group, timer, phase, start,
                           send.element_size() * send.numel(), tracked)
