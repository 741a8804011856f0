"""`python -m moetrain.train` for the preemption tests, with real signals sent through the
checkpointer's `faults` hook (moetrain.checkpoint.Faults):

- MOETRAIN_TEST_SIGNAL=rank=R,step=N[,sig=TERM]: rank R sends itself that signal (os.kill) at the
  top of loop step N (N steps completed), before the step's agreement starts: the run then
  finishes step N+1 and stops with a checkpoint at step N+1.
- PREEMPT_TEST_SIGNALS_IN_SAVE=N: the first Checkpointer.save first sends this process N SIGTERMs
  (through the checkpointer's `faults` hook, moetrain.checkpoint.Faults.before_save), i.e. further
  signals arrive while the preemption checkpoint is being written.

Usage: python tests/checkpoint/_preempt_main.py --config FILE [overrides ...] (train.device=cpu
is the caller's duty, as for the CLI).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moetrain.checkpoint import Faults  # noqa: E402
from moetrain.train.preempt import parse_signals  # noqa: E402

TEST_ENV = "MOETRAIN_TEST_SIGNAL"


class Signals(Faults):
    def __init__(self, spec: str, in_save: int):
        kv = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        self.rank, self.step = int(kv.get("rank", -1)), int(kv.get("step", -1))
        self.sig = parse_signals(kv.get("sig", "TERM"))[0]
        self.in_save = in_save

    def at_step(self, step: int, rank: int) -> None:
        if (rank, step) == (self.rank, self.step):
            os.kill(os.getpid(), self.sig)
            time.sleep(0.05)        # the handler runs at the next bytecode boundary of this thread

    def before_save(self, step: int) -> None:
        for _ in range(self.in_save):
            os.kill(os.getpid(), signal.SIGTERM)
        self.in_save = 0


def main() -> int:
    from moetrain.train.cli import main as cli_main
    faults = Signals(os.environ.get(TEST_ENV, ""), int(os.environ.get("PREEMPT_TEST_SIGNALS_IN_SAVE", "0")))
    return cli_main(sys.argv[1:], faults=faults)


if __name__ == "__main__":
    raise SystemExit(main())
