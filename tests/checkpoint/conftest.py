"""Runs shared by several checkpoint test files (each is a few seconds of gloo training)."""
from __future__ import annotations

import pytest

import ckpt_helpers as H
from _dist import run_dist



@pytest.fixture(scope="session")
def w2_straight(tmp_path_factory):
    """World 2, ep 2, 20 steps, checkpoints every 5: (losses by step, checkpoint dir)."""
    root = tmp_path_factory.mktemp("w2_straight")
    losses = run_dist(H.train, 2, (str(root / "runs"), str(root / "ckpt"), H.W2_EXTRA))[0]
    return losses, root / "ckpt"


@pytest.fixture(scope="session")
def w4_run(tmp_path_factory):
    """dp 4, ep 4, dropless, 10 steps, checkpoints at 5 and 10: (losses by step, checkpoint dir)."""
    root = tmp_path_factory.mktemp("w4")
    losses = run_dist(H.train, 4, (str(root / "runs"), str(root / "ckpt"), H.W4_EXTRA))[0]
    return losses, root / "ckpt"
