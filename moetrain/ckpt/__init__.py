"""Checkpoint internals. moetrain.checkpoint is the public entry point (Checkpointer).

  store.py : the directory layout, manifest, verification, atomic commit, retention, DCP I/O
  state.py : model / optimizer / RNG / train state <-> flat checkpoint keys (global expert ids)
"""
