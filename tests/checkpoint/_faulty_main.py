"""`python -m moetrain.train` with a fault injected through the checkpointer's `faults` hook
(moetrain.checkpoint.Faults, passed as cli.main(argv, faults=...)), for the crash-safety tests:

  --kill rank=R,step=N[,marker=PATH]  SIGKILL rank R at the top of step N; with a marker file
                                      only once (the marker is created first): torchrun restarts
  --crash PHASE@STEP                  rank 0 ends with os._exit(CRASH_EXIT_CODE) inside the commit
                                      of step STEP, PHASE: written | manifest | renamed

Usage: python tests/checkpoint/_faulty_main.py (--kill SPEC | --crash SPEC) --config FILE [overrides ...]
(train.device=cpu is the caller's duty, as for the CLI).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moetrain.checkpoint import Faults  # noqa: E402

CRASH_EXIT_CODE = 86


class KillAt(Faults):
    def __init__(self, spec: str):
        kv = dict(item.split("=", 1) for item in spec.split(","))
        self.rank, self.step, self.marker = int(kv["rank"]), int(kv["step"]), kv.get("marker")

    def at_step(self, step: int, rank: int) -> None:
        if (rank, step) != (self.rank, self.step):
            return
        if self.marker:
            if os.path.exists(self.marker):
                return
            with open(self.marker, "w") as f:
                f.write(f"killed rank {rank} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


class CrashIn(Faults):
    def __init__(self, spec: str):
        phase, _, step = spec.partition("@")
        self.phase, self.step = phase, int(step)

    def in_commit(self, phase: str, step: int) -> None:
        if (phase, step) == (self.phase, self.step):
            os._exit(CRASH_EXIT_CODE)


def main(argv: list[str]) -> int:
    from moetrain.train import cli
    kind, spec, rest = argv[0], argv[1], argv[2:]
    return cli.main(rest, faults={"--kill": KillAt, "--crash": CrashIn}[kind](spec))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
