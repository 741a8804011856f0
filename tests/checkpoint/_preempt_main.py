"""`python -m moetrain.train` for the preemption tests, plus one thing they need:

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moetrain.checkpoint import Faults  # noqa: E402


class SignalsInSave(Faults):
    def __init__(self, n: int):
        self.n, self.fired = n, False

    def before_save(self, step: int) -> None:
        if not self.fired:
            self.fired = True
            for _ in range(self.n):
                os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    from moetrain.train.cli import main as cli_main
    n = int(os.environ.get("PREEMPT_TEST_SIGNALS_IN_SAVE", "0"))
    return cli_main(sys.argv[1:], faults=SignalsInSave(n) if n else None)


if __name__ == "__main__":
    raise SystemExit(main())
