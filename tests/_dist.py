"""Run a test body on N gloo ranks (CPU processes) and collect each rank's return value.

    results = run_dist(body, world=4, args=(...))   # body(rank, world, *args) at module level

Each rank gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in its environment, one torch
thread, and a short collective timeout, so a mismatched collective fails the test instead of
hanging CI. Any exception on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback

from moetrain.parallel.rendezvous import free_port

DEFAULT_TIMEOUT_S = 120




def _child(fn, rank, world, port, args, queue):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "MOETRAIN_DIST_TIMEOUT": "60"})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        # plain pickle copies tensors by value; the queue's own pickler would share their memory
        # through file descriptors that die with this process
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_dist(fn, world: int, args: tuple = (), timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = pickle.loads(payload)
    except Exception as exc:  # queue.Empty: a rank hung or died without reporting
        errors.append(f"timed out after {timeout_s}s waiting for ranks {sorted(set(range(world)) - set(results))} "
                      f"({type(exc).__name__}); exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
