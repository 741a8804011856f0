"""Process-level settings for CPU training: intra-op threads and the C allocator.

Expert weights' gradients are large ([L, D, H] per weight; 64 MiB at L=128, D=256, H=512) and are
allocated fresh every step. glibc serves allocations above its mmap threshold (at most 32 MiB)
with a new mmap and returns them to the OS on free, so every step page-faults the gradient
buffers in again (~16k faults and ~30-50 ms of kernel time per 64 MiB on the 2-core CI machine).
Raising the mmap and trim thresholds keeps freed memory in the process for the next step,
as PyTorch's CPU performance guide suggests (via jemalloc/tcmalloc, or these glibc knobs).

Settings already given in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) win;
MOETRAIN_MALLOC_TUNE=0 turns this off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30          # blocks up to 1 GiB come from (and return to) the heap
_done = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks instead of unmapping them. Returns whether it did."""
    global _done
    if _done:
        return True
    if os.environ.get("MOETRAIN_MALLOC_TUNE", "1") == "0" or os.name != "posix":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):          # musl, macOS: no mallopt
        return False
    ok = True
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok &= bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_KEEP_BYTES)))
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_KEEP_BYTES)))
    _done = ok
    return ok


def bound_per_task(launcher: str, environ=os.environ) -> bool:
    """Whether srun started this process (launcher "slurm", see parallel/mesh.read_launch_env)
    and pinned it to CPUs of its own: srun binds each task (--cpu-bind=cores, map_cpu, mask_cpu,
    ... and many sites' defaults) and exports the binding as SLURM_CPU_BIND_TYPE; `none` (or no
    variable) means the tasks share the allocation. Workers of torchrun or mpiexec inside an
    allocation inherit the variable from the batch step, so only srun's own tasks count."""
    kind = environ.get("SLURM_CPU_BIND_TYPE", "").strip().lower()
    return launcher == "slurm" and bool(kind) and not kind.startswith("none")


def threads_per_process(requested: int, local_processes: int, launcher: str = "single",
                        environ=os.environ) -> int:
    """`requested` if set (> 0), else the cores this process may use (a Slurm/cgroup allocation,
    taskset) shared evenly by the processes on this node; when srun already bound the task to its
    own cores, all of them (dividing again would leave most of them idle)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if bound_per_task(launcher, environ):
        return max(1, cores)
    return max(1, cores // max(1, local_processes))


def configure_cpu_process(requested_threads: int, local_processes: int, launcher: str = "single") -> int:
    """Intra-op threads for this process (see threads_per_process) and, off CUDA, allocator
    settings for large tensors. Returns the thread count."""
    import torch
    threads = threads_per_process(requested_threads, local_processes, launcher)
    torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        keep_freed_memory()
    return threads
