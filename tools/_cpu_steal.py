"""Hypervisor steal time over an interval, from /proc/stat (Linux; None elsewhere).

On a virtual machine the host may run other guests on our vCPUs: the guest sees that time as
`steal`. Wall-clock benchmarks taken while steal is high are slower by an amount that differs
between systems (many small ops suffer more than a few big ones), so benchmarks report it.
"""
from __future__ import annotations

from typing import Optional

_STAT = "/proc/stat"


def _cpu_times() -> Optional[list[int]]:
    """Aggregate jiffies: user nice system idle iowait irq softirq steal ..."""
    try:
        with open(_STAT) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 9:
        return None
    return [int(v) for v in first[1:]]


class StealMeter:
    """`start()`, run the work, `fraction()` -> steal / all CPU time in between (None if unknown)."""

    def __init__(self):
        self._t0: Optional[list[int]] = None

    def start(self) -> "StealMeter":
        self._t0 = _cpu_times()
        return self

    def fraction(self) -> Optional[float]:
        t1 = _cpu_times()
        if self._t0 is None or t1 is None:
            return None
        # guest / guest_nice (fields 9, 10) are already counted in user / nice
        delta = [b - a for a, b in zip(self._t0[:8], t1[:8])]
        total = sum(delta)
        return delta[7] / total if total > 0 else None
