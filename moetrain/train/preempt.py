"""Graceful preemption (Megatron-LM's --exit-signal-handler): on SIGTERM or SIGUSR1, finish the
current step, save a checkpoint, and end every rank together with a distinct exit code.

Which signals: config key `train.exit_signals` (a list of names with or without SIG, or numbers;
default [SIGTERM, SIGUSR1]; [] turns the handling off). SIGKILL and SIGSTOP cannot be caught and
are refused. The list is the same on every rank (the start-up config agreement checks it; the
agreement below is a collective that runs only when it is set).

How (moetrain/train/loop.py):
  - the handlers only record the signal (first signal number, count): no I/O, no locks. Python
    runs them in the main thread between bytecodes; a rank blocked in a collective notices when
    the collective returns.
  - every step, every rank agrees whether ANY rank got a signal (a `kill -TERM` of one pid reaches
    one rank; Slurm and torchrun signal all): a MAX all-reduce of one int32 (the signal number,
    0 = none) over the world group, on the training device (NCCL takes no host tensors).
    Cost per step: one tiny collective, launched asynchronously when the step starts (it
    overlaps forward and backward), and one 4-byte host read placed right after the step's
    existing host sync (the gradient norm read that decides whether the step is taken), where the
    stream is already drained: no extra stall of the GPU queue. World 1: no collective, no read.
    The tensor is a fill (torch.full), not a host-to-device copy, so launching it never syncs.
  - when they agree, the step in progress finishes (optimizer step included); the loop then
    stops at the next step boundary, saves through the Checkpointer when checkpointing is on
    (checkpoint.every > 0; an async save is waited for until it is committed), rank 0 logs one
    line, and every rank raises Preempted; the CLI turns it into the exit code. With
    checkpointing off it stops all the same and says that nothing was saved.
  - a signal during the last step does not count: the run completes normally (exit 0).

Exit code: 128 + the signal number (143 SIGTERM, 138 SIGUSR1), the shell's convention for "ended
by signal N", on every rank (the agreed signal: the largest number any rank received). Non-zero,
so a `train && next` chain, torchrun (it restarts the group when --max-restarts allows, and the
restart resumes from the checkpoint just written) and Slurm (`srun -K`, job state) do not take a
preempted run for a finished one; Kubernetes/TorchElastic and shells already read 143 as "stopped
by SIGTERM". It stays distinguishable from a process the signal killed outright: waitpid reports
exited(143) here, killed-by-signal(15) there (Python: returncode 143 vs -15; sacct: 143:0 vs 0:15).
Slurm requeues a preempted job regardless of the code; with `RequeueExit=143,138` in slurm.conf
it also requeues after a `kill`/`scancel --signal` that only reached the tasks.

A second signal while finishing the step or saving is ignored (counted only): schedulers and
launchers routinely deliver SIGTERM twice (torchrun forwards the agent's SIGTERM to workers that
already got it from a process-group kill; Slurm signals the step and the batch shell), and
exiting then would throw away the save the first one asked for. The hard stop stays what it is:
SIGKILL after Slurm's KillWait (default 30 s) or torchrun's shutdown timeout (default 30 s,
TORCH_ELASTIC_SHUTDOWN_TIMEOUT), so one step plus one save must fit in that grace period. The
previous handlers are restored when run_training returns or raises: after the checkpoint has
been committed a further signal has its default effect again.

Tests send real signals through the checkpointer's fault hook (tests/checkpoint/_preempt_main.py).
"""
from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, so moetrain.config can import parse_signals (validation of
# train.exit_signals) without pulling torch in
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


class Preempted(RuntimeError):
    """A preemption signal stopped training (on every rank alike, after the checkpoint, if any,
    was committed). `exit_code` is 128 + the signal number; the CLI exits with it."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint      # path of the checkpoint saved (or already there), or None
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def parse_signals(spec: Iterable[str] | str | None) -> tuple[int, ...]:
    """"TERM,USR1" / ["SIGTERM", "SIGUSR1"] / "15" -> signal numbers; "", "none", [] -> ().
    Raises ValueError with one line for an unknown or uncatchable signal."""
    if spec is None:
        return ()
    items = spec.replace(",", " ").split() if isinstance(spec, str) else [str(s) for s in spec]
    if [s.lower() for s in items] in ([], ["none"]):
        return ()
    out: list[int] = []
    for item in items:
        name = item.strip().upper()
        if name.isdigit():
            try:
                sig = signal.Signals(int(name))
            except ValueError:
                raise ValueError(f"exit signal {item!r}: no such signal number") from None
        else:
            name = name if name.startswith("SIG") else "SIG" + name
            sig = getattr(signal.Signals, name, None)
            if sig is None:
                raise ValueError(f"exit signal {item!r}: no such signal (e.g. SIGTERM, SIGUSR1, SIGINT)")
        if sig in _UNCATCHABLE:
            raise ValueError(f"exit signal {item!r}: {sig.name} cannot be caught")
        if int(sig) not in out:
            out.append(int(sig))
    return tuple(out)


def configured_signals(cfg) -> tuple[int, ...]:
    """train.exit_signals as signal numbers (validated with the config: parse_signals)."""
    return parse_signals(cfg.train.exit_signals)


class PreemptionWatch:
    """Signal flag + per-step agreement over the world group. See the module docstring."""

    def __init__(self, signals: tuple[int, ...], par):
        self.signals = tuple(signals)
        self.par = par
        self.received = 0          # the first signal this rank got (0: none)
        self.count = 0             # how many (later ones are ignored)
        self.agreed = 0            # the signal all ranks agreed on (0: keep training)
        self.installed = False
        self._previous: dict[int, object] = {}
        self._buf: Optional[torch.Tensor] = None
        self._work = None

    @property
    def enabled(self) -> bool:
        return bool(self.signals)

    # ------------------------------------------------------------------ handlers

    def _handler(self, signum, frame) -> None:   # only a flag: no I/O, no allocation that matters
        if not self.received:
            self.received = signum
        self.count += 1

    def install(self) -> bool:
        """Install the handlers (main thread only: Python's rule). False when they could not be;
        the agreement still runs, so the ranks stay in step."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return False
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        self.installed = True
        return True

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    # ------------------------------------------------------------------ per-step agreement

    def launch(self) -> None:
        """Start this step's agreement: async MAX all-reduce of the local signal number."""
        if not self.signals or self.par.world == 1:
            return
        import torch
        import torch.distributed as dist
        self._buf = torch.full((1,), self.received, dtype=torch.int32, device=self.par.device)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.par.world_group, async_op=True)

    def resolve(self) -> None:
        """Read the agreement (call right after the step's own host sync)."""
        if not self.signals:
            return
        if self._work is None:                       # world 1
            self.agreed = self.agreed or self.received
            return
        self._work.wait()
        value = int(self._buf.item())
        self._work = self._buf = None
        self.agreed = self.agreed or value

    def sync(self) -> None:
        """Blocking agreement point (at the very end, so no rank exits before rank 0 has logged)."""
        if self.par.world > 1:
            import torch
            import torch.distributed as dist
            t = torch.zeros(1, dtype=torch.int32, device=self.par.device)
            dist.all_reduce(t, group=self.par.world_group)
            t.cpu()
