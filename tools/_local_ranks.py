"""Run a tool's per-rank function on N local processes (gloo/NCCL), the way torchrun would.

    run_local_ranks(rank_main, args, world)     # rank_main(args, rank, world) at module level

Each process gets torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and ends through moetrain.parallel.mesh.exit_now, skipping interpreter
finalization (which can abort after a destroyed process group).
"""
from __future__ import annotations

import os

from moetrain.parallel.rendezvous import free_port


def exit_now(code: int) -> None:
    from moetrain.parallel.mesh import exit_now as _exit_now
    _exit_now(code)


def _entry(local_rank: int, rank_main, args, world: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(world)})
    rank_main(args, local_rank, world)
    exit_now(0)


def run_local_ranks(rank_main, args, world: int) -> None:
    import torch.multiprocessing as mp
    mp.start_processes(_entry, args=(rank_main, args, world, free_port()), nprocs=world, join=True,
                       start_method="spawn")
