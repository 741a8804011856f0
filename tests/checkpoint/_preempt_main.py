"""`python -m moetrain.train` for the preemption tests, plus two things the tests need:

- Preempted -> its exit code (128 + signal number). Once the CLI maps Preempted itself, main()
  returns that code and the except below is never taken; until then the CLI lets it through.
- PREEMPT_TEST_SIGNALS_IN_SAVE=N: the first Checkpointer.save first sends this process N SIGTERMs,
  i.e. further signals arrive while the preemption checkpoint is being written.

Usage: python tests/checkpoint/_preempt_main.py --config FILE [overrides ...] (train.device=cpu
is the caller's duty, as for the CLI).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _signal_in_save(n: int) -> None:
    from moetrain.checkpoint import Checkpointer
    original = Checkpointer.save
    fired = []

    def save(self, trainer):
        if not fired:
            fired.append(True)
            for _ in range(n):
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, trainer)

    Checkpointer.save = save


def main() -> int:
    from moetrain.train.cli import main as cli_main
    from moetrain.train.preempt import Preempted
    n = int(os.environ.get("PREEMPT_TEST_SIGNALS_IN_SAVE", "0"))
    if n:
        _signal_in_save(n)
    try:
        return cli_main(sys.argv[1:])
    except Preempted as exc:          # the CLI's finally (shutdown) has run
        sys.stdout.flush()
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
