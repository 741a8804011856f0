"""Command line: python -m moetrain.train --config configs/X.yaml [group.key=value ...]

Everything that can be wrong with the input (config, launch environment, data files) is checked
here on every rank BEFORE the first collective, so each rank exits 2 with the same single line;
then the ranks check at the rendezvous that they all arrived and agree on config and code.
"""
from __future__ import annotations

import argparse
import os
import sys

from moetrain.errors import first_line

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_OOM = 1


def _parse(argv):
    ap = argparse.ArgumentParser(prog="moetrain-train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default=None, help="YAML config (default: built-in tiny CPU config)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=16 parallel.ep=2")
    return ap.parse_args(argv)


def _error(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    """One `moetrain: error:` line on stderr in ONE write: the ranks of a job share the stream, and
    print's separate write of the newline let two ranks' lines run together."""
    line = f"moetrain: error: {msg}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):    # a stream without a descriptor (embedding)
        sys.stderr.write(line)
    else:
        sys.stderr.flush()
        os.write(fd, line.encode())
    return code



def _out_of_memory(exc: BaseException) -> bool:
    import torch
    oom = getattr(torch, "OutOfMemoryError", ())
    return isinstance(exc, MemoryError) or (oom and isinstance(exc, oom)) \
        or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def main(argv=None, faults=None) -> int:
    """faults: a moetrain.checkpoint.Faults for the crash-safety tests (None: no faults)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    # imports after argparse so `--help` is instant
    from moetrain.config import (ConfigError, agreement_view, check_output_dirs, load_config, resolve_layout,
                                 validate_layout)
    from moetrain.data import DataError, load_token_data
    from moetrain.parallel.mesh import LaunchError, init_parallel, read_launch_env, shutdown

    try:
        env = read_launch_env()
        cfg = load_config(args.config, args.overrides)
        cfg, chosen = resolve_layout(cfg, env.world_size)      # parallel.ep=auto: this start's ep
        if chosen and env.rank == 0:
            print(f"moetrain: {chosen}", flush=True)
        dp, tp, ep = validate_layout(cfg, env.world_size)
        check_output_dirs(cfg, env.world_size)
        data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size, cfg.data.cache_dir)
        if len(data.train) <= cfg.train.seq_len or len(data.val) <= cfg.train.seq_len:
            raise DataError(f"data split shorter than train.seq_len+1={cfg.train.seq_len + 1} tokens "
                            f"(train {len(data.train)}, val {len(data.val)})")
    except (ConfigError, LaunchError, DataError) as exc:
        return _error(str(exc))

    from moetrain.checkpoint import CheckpointError
    from moetrain.cpu_runtime import configure_cpu_process
    from moetrain.precision import configure_determinism
    from moetrain.train.loop import Preempted, TrainingDiverged, run_training

    configure_cpu_process(cfg.train.num_threads, env.local_world_size, env.launcher)
    configure_determinism(cfg.train.deterministic)
    try:
        # the ranks meet at the rendezvous (MOETRAIN_RENDEZVOUS_TIMEOUT) and compare their resolved
        # configs and code before the process group exists: a difference or a missing rank ends
        # every rank with one line instead of a hang, a gloo abort or silently different weights
        par = init_parallel(dp, tp, ep, env, cfg.train.device, backend=cfg.parallel.backend,
                            agree=agreement_view(cfg))
    except LaunchError as exc:
        return _error(str(exc))
    try:
        run_training(cfg, par, data, log=lambda m: print(m, flush=True), faults=faults)
    except (CheckpointError, ConfigError) as exc:   # raised on every rank alike (rank 0 decides and
        return _error(str(exc))                    # broadcasts; device-dependent config checks)
    except TrainingDiverged as exc:  # raised on every rank alike (a global norm)
        return _error(str(exc), EXIT_DIVERGED)
    except Preempted as exc:         # every rank alike, after the checkpoint (if any) committed
        return exc.exit_code         # 128 + signal number: 143 SIGTERM, 138 SIGUSR1
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        return _error(f"out of memory ({first_line(exc)[:300]}): reduce the model (e.g. model.max_seq_len, "
                      "model.dim), train.micro_batch_size, or use more ranks", EXIT_OOM)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
