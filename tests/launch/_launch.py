"""Shared pieces of the real-launcher tests (imported as `_launch`): a tiny training config, a process runner that never
leaves strays, and a reader for the run's metrics.jsonl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from moetrain.parallel.rendezvous import free_port  # noqa: F401  (the launch tests' ports)

REPO = Path(__file__).resolve().parents[2]
STEPS = 3

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "model.ffn_hidden=64", "train.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", f"train.steps={STEPS}", "train.eval_every=0",
        "logging.tensorboard=false", "logging.every=1", "train.progress=false", "train.num_threads=1",
        "parallel.ep=2", "train.device=cpu"]     # gloo CPU ranks even where a GPU is visible


def tiny_overrides(tmp: Path, run_name: str = "run") -> list[str]:
    """The tiny 2-rank EP config, writing only under tmp (a stale checkpoints/ in the checkout
    must never be resumed by a launcher that passes checkpoint.resume=auto)."""
    return TINY + [f"logging.dir={tmp / 'runs'}", f"logging.run_name={run_name}",
                   f"checkpoint.dir={tmp / 'ckpt'}"]


def launch_env(**extra: str) -> dict:
    """The caller's environment minus launcher variables a parent (pytest under torchrun, srun or
    mpiexec) may have left, with this interpreter as PYTHON."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_"))}
    env.update(PYTHON=sys.executable, MOETRAIN_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """Start cmd in its own session (so a timeout can end it with all its children)."""
    f = open(log, "wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Wait for every process; on timeout TERM then KILL the process groups we started."""
    import time
    deadline = time.monotonic() + timeout_s
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        raise AssertionError(f"launch did not finish within {timeout_s:.0f}s")
    return codes


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"({exc})"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_trained(run_dir: Path, world: int, steps: int = STEPS) -> list[dict]:
    """metrics.jsonl holds steps 1..steps, gathered from `world` ranks, with finite losses."""
    recs = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, steps + 1)), [r["step"] for r in recs]
    for r in recs:
        assert r["loss"] == r["loss"] and 0 < r["loss"] < 20, r
        assert len(r["ranks.step_ms"]) == world, r["ranks.step_ms"]
        assert len(r["ranks.recv_tokens"]) == world
    return recs


def mpi_skip_reason():
    """Why an MPI launch cannot run here, or None."""
    import importlib.util
    import shutil
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (tools/setup_env.sh installs mpi4py + the mpich wheel)"
    if shutil.which("mpiexec") is None and not (Path(sys.executable).parent / "mpiexec").exists():
        return "no mpiexec on PATH or beside python (tools/setup_env.sh installs the mpich wheel, which provides it)"
    return None


