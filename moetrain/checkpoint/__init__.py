"""Sharded checkpoints: the public entry point is `Checkpointer` (checkpointer.py).

  checkpointer.py : save / resume / retention / async save for the training loop
  store.py        : the directory layout, manifest, verification, atomic commit, retention, DCP I/O
  state.py        : model / optimizer / RNG / train state <-> flat checkpoint keys (global expert ids)
  dcp_reader.py   : the restricted unpickler and DCP reader: loading a checkpoint never runs code
  lock.py         : one run per checkpoint directory (hard-link lock, heartbeat, stale takeover)
  convert.py      : whole-checkpoint read/write for the offline tools
"""
from moetrain.checkpoint.checkpointer import Checkpointer
from moetrain.checkpoint.store import CheckpointError, CheckpointRefused, Faults

__all__ = ["Checkpointer", "CheckpointError", "CheckpointRefused", "Faults"]
