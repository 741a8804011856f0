"""Launch environment -> process group -> one DeviceMesh with named axes. The ONLY place groups
are made; everything else receives them as arguments.

Rank layout (tp innermost, so a TP group sits on neighbouring GPUs of one node):
    rank = (edp_idx * ep + ep_idx) * tp + tp_idx        dp_idx = edp_idx * ep + ep_idx
Mesh axes: ("edp", "ep", "tp"); "dp" is "edp" x "ep" flattened.
  dp  : ranks holding the same dense weights (dense gradients are summed here)
  ep  : ranks that share out the experts (tokens travel here by all-to-all)
  edp : ranks holding the same experts (expert gradients are summed here)
"""
from __future__ import annotations

import gc
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from moetrain.errors import first_line


class LaunchError(RuntimeError):
    """One line: which environment variable is missing or wrong."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str          # single | torchrun | slurm | mpi


def _int_env(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment variable {name}={v!r} is not an integer") from None


def read_launch_env() -> LaunchEnv:
    """torchrun's variables first, then MPI (Open MPI, MPICH/Hydra), then Slurm's srun, else a
    single process. Slurm comes last because its variables leak into every process started inside
    an allocation: torchrun workers and `mpiexec` ranks in a batch script all see the batch
    step's SLURM_PROCID=0 / SLURM_NTASKS, while their own launcher's variables are right."""
    candidates = [
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ]
    for launcher, r_key, w_key, lr_key, lw_key in candidates:
        rank = _int_env(r_key)
        if rank is None:
            continue
        world = _int_env(w_key)
        if world is None:
            raise LaunchError(f"{r_key} is set but {w_key} is not: incomplete {launcher} environment")
        if world < 1 or not 0 <= rank < world:
            raise LaunchError(f"{r_key}={rank} is outside 0..{w_key}-1 ({w_key}={world})")
        local_rank = _int_env(lr_key)
        local_world = _int_env(lw_key) if launcher != "slurm" else _slurm_tasks_per_node()
        if local_rank is None:
            local_rank = rank
        if local_world is None:
            local_world = world
        return LaunchEnv(rank, world, local_rank, max(1, local_world), launcher)
    return LaunchEnv(0, 1, 0, 1, "single")


def _slurm_tasks_per_node() -> Optional[int]:
    v = os.environ.get("SLURM_TASKS_PER_NODE", "")     # e.g. "4(x2)" or "2"
    head = v.split("(")[0].split(",")[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    ep: int

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        return self.dp // self.ep


@dataclass(frozen=True)
class Parallel:
    """Everything a rank knows about the layout. Groups are None at world size 1."""
    dims: ParallelDims
    rank: int
    device: torch.device
    mesh: object = None
    world_group: object = None
    dp_group: object = None
    ep_group: object = None
    edp_group: object = None
    tp_group: object = None

    @property
    def world(self) -> int:
        return self.dims.world

    @property
    def tp_rank(self) -> int:
        return self.rank % self.dims.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.dims.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.dims.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_mesh(self):
        """The "tp" axis as a 1-D DeviceMesh (tensor-parallel DTensors live on it); None at tp=1."""
        return self.mesh["tp"] if self.dims.tp > 1 else None


def pick_device(kind: str, local_rank: int, backend: str = "auto") -> torch.device:
    """This rank's device. With one visible GPU, that GPU: launchers that bind one GPU per task
    (Slurm --gpus-per-task / --gpu-bind, per-rank CUDA_VISIBLE_DEVICES) show each rank only its
    own, as cuda:0. With several, the LOCAL_RANK-th; ranks beyond the visible GPUs share them
    round-robin under gloo, which allows it (NCCL refuses two ranks on one GPU)."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("train.device=cuda but CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if n == 1:
            return torch.device("cuda", 0)
        if local_rank < n:
            return torch.device("cuda", local_rank)
        if backend == "gloo":
            return torch.device("cuda", local_rank % n)
        raise LaunchError(f"LOCAL_RANK={local_rank} but only {n} GPUs are visible: NCCL needs one GPU per rank "
                          "(start fewer ranks per node, or set parallel.backend=gloo to let ranks share GPUs)")
    return torch.device("cpu")


def process_group_backend(requested: str, device: torch.device) -> str:
    """The torch.distributed backend string for `parallel.backend` on this device.

    auto: NCCL on CUDA, gloo on CPU. gloo on CUDA is "cuda:gloo": gloo moves CUDA tensors
    through host memory, so several ranks can share one GPU, and a group made for the CUDA device
    type only rejects CPU tensors exactly as NCCL does (a test of the device rules without a
    cluster)."""
    if requested == "nccl" and device.type != "cuda":
        raise LaunchError("parallel.backend=nccl needs CUDA, but this rank runs on the CPU")
    if device.type != "cuda":
        return "gloo"
    return "cuda:gloo" if requested == "gloo" else "nccl"


def first_slurm_host(nodelist: str) -> Optional[str]:
    """The first host of a Slurm hostlist: "n1" -> n1, "gpu[003-010,20]" -> gpu003,
    "a[1-2],b[5]" -> a1, "rack[1-2]-n[7-8]" -> rack1-n7. None when it cannot be read."""
    first, depth = [], 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        first.append(ch)
    host = "".join(first)
    host = re.sub(r"\[([^],-]+)[^]]*\]", r"\1", host)      # each [a-b,c] -> its first entry a
    return host if host and re.fullmatch(r"[A-Za-z0-9._-]+", host) else None


def _master_port() -> int:
    port = _int_env("MASTER_PORT")
    if port is None or not 1 <= port <= 65535:
        raise LaunchError(f"environment variable MASTER_PORT={os.environ.get('MASTER_PORT')!r} "
                          "is not a port number (1..65535)")
    return port


def _ensure_rendezvous(env: LaunchEnv) -> None:
    """torchrun sets MASTER_ADDR/PORT; srun and mpiexec may not. Under MPI, rank 0 shares its
    address and a free port through mpi4py; under Slurm the address is the job's first node and
    the port 20000 + job id % 20000 (launch/slurm.sbatch leaves both to this rule)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        _master_port()
        return
    if env.launcher == "slurm":
        host = first_slurm_host(os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "")
        job = os.environ.get("SLURM_JOB_ID", "")
        if host and job.isdigit():
            os.environ.setdefault("MASTER_ADDR", host)
            os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000))
            port = _master_port()
            if env.rank == 0:
                print(f"moetrain: Slurm rendezvous {os.environ['MASTER_ADDR']}:{port}", flush=True)
            return
    if env.launcher == "mpi":
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchError("launched by MPI without MASTER_ADDR/MASTER_PORT and mpi4py is not "
                              "installed: pip install mpi4py, or use launch/mpirun.sh") from None
        comm = MPI.COMM_WORLD
        _check_mpi_size(comm, env)
        addr_port = None
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            addr_port = (os.environ.get("MASTER_ADDR") or socket.gethostname(), port)
        addr, port = comm.bcast(addr_port, root=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = str(addr), str(port)
        return
    raise LaunchError(f"launched by {env.launcher} (world {env.world_size}) but MASTER_ADDR/MASTER_PORT "
                      "are not set: use launch/slurm.sbatch or export them")


def _check_mpi_size(comm, env: LaunchEnv) -> None:
    """PMI_/OMPI_ variables say world N, but without mpiexec mpi4py sees a world of 1: rank 0
    would publish its address to itself and every rank wait for peers that never come."""
    size = comm.Get_size()
    if size != env.world_size:
        raise LaunchError(f"the environment says MPI world {env.world_size} but MPI reports {size} "
                          "process(es): start it with mpiexec -n N (or unset the PMI_/OMPI_ variables)")


def _seconds_env(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1e7:          # timedelta overflows far above; ~115 days is already "never"
        raise LaunchError(f"environment variable {name}={raw!r} is not a number of seconds in (0, 1e7]")
    return value


def _timeout(timeout_s: Optional[float]) -> timedelta:
    """The collective timeout: MOETRAIN_DIST_TIMEOUT seconds (default 600)."""
    if timeout_s:
        return timedelta(seconds=timeout_s)
    return timedelta(seconds=_seconds_env("MOETRAIN_DIST_TIMEOUT", 600))


def init_parallel(dp: int, tp: int, ep: int, env: LaunchEnv, device_kind: str = "auto",
                  timeout_s: Optional[float] = None, backend: str = "auto",
                  agree: Optional[dict] = None) -> Parallel:
    """Create the process group and mesh. Call only after the config was validated against
    env.world_size, so a bad layout never reaches a collective.

    Before the process group exists, the ranks meet at the rendezvous store (waiting at most
    MOETRAIN_RENDEZVOUS_TIMEOUT) and compare the code fingerprint and `agree` (the CLI passes
    its resolved config, moetrain.config.agreement_view): a rank that differs or never arrives
    ends every arrived rank with LaunchError, the same line on each."""
    dims = ParallelDims(dp, tp, ep)
    device = pick_device(device_kind, env.local_rank, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size == 1:
        return Parallel(dims, 0, device)
    from moetrain.parallel.rendezvous import agree_at_startup, code_fingerprint, open_store, rendezvous_timeout
    timeout = _timeout(timeout_s)
    rdzv_s = rendezvous_timeout()
    pg_backend = process_group_backend(backend, device)
    if not dist.is_initialized():      # else a group made by the caller (tests, tools) is used as is
        _ensure_rendezvous(env)
        where = f" at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            deadline = time.monotonic() + rdzv_s
            store = open_store(env, rdzv_s, deadline)
            agree_at_startup(store, env.rank, env.world_size, {"code": code_fingerprint(), **(agree or {})},
                             rdzv_s, where, deadline)
            store.set_timeout(timeout)
            # device_id (NCCL): the communicator is created now, so a bad GPU binding fails here
            dist.init_process_group(pg_backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout,
                                    device_id=device if pg_backend == "nccl" else None)
        except (dist.DistStoreError, dist.DistNetworkError) as exc:
            raise LaunchError(f"rendezvous of {env.world_size} ranks{where} failed ({first_line(exc)}): "
                              "are all ranks started?") from None
        except dist.DistBackendError as exc:
            if "Duplicate GPU" not in str(exc):
                raise
            raise LaunchError(f"two ranks were given the same GPU ({device}): NCCL needs one GPU per rank; "
                              "check the launcher's GPU binding, or set parallel.backend=gloo to let ranks "
                              "share GPUs") from None
    else:                              # the caller's default group must be the launch's world
        have = (dist.get_rank(dist.group.WORLD), dist.get_world_size(dist.group.WORLD))
        if have != (env.rank, env.world_size):
            raise LaunchError(f"the existing default process group is rank {have[0]} of {have[1]}, "
                              f"but the launch says rank {env.rank} of {env.world_size}")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (dims.edp, ep, tp), mesh_dim_names=("edp", "ep", "tp"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    return Parallel(dims, env.rank, device, mesh, dist.group.WORLD,
                    dp_group=dp_mesh.get_group(), ep_group=mesh["ep"].get_group(),
                    edp_group=mesh["edp"].get_group(), tp_group=mesh["tp"].get_group())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        # The flattened "dp" mesh group leaves garbage in reference cycles; freed later by the
        # interpreter's exit it can abort the process ("terminate called without an active
        # exception", SIGABRT after a finished run: 7 of 20 exits at world 2 on torch 2.13/gloo
        # on a loaded box). Collecting now, while torch is fully alive, frees it safely (0 of 30
        # after); exit_now() below closes what is left of that window.
        gc.collect()


def exit_now(code: int = 0) -> None:
    """End this process without interpreter finalization, after shutdown().

    Late destructors of gloo objects can still abort a finished rank at interpreter exit on a
    loaded machine (SIGABRT turns a good run into a failed one for mpiexec/torchrun/srun). Flush
    stdio, finalize MPI if mpi4py started it (the launcher expects it), then os._exit. Callers
    close their files first."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.Finalize()
        except Exception:
            pass
    os._exit(code)
