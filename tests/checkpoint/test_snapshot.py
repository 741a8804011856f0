"""In-memory snapshots with a peer replica (checkpoint.snapshot_every, checkpoint/snapshot.py): two
ranks posing as two nodes (MOETRAIN_NODE a and b); each node's directory holds both ranks' files
after a save; with node b's memory gone and the newest snapshot gone, a restart completes the older
snapshot on both nodes from node a's copy and continues it exactly."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import ckpt_helpers as H
from _dist import run_dist

pytestmark = pytest.mark.slow

EXTRA = ["parallel.ep=2", "train.steps=8", "checkpoint.every=0", "checkpoint.snapshot_every=2", "checkpoint.resume=auto"]


def _train(rank, world, log_dir, ckpt_dir, shm, extra):
    os.environ["MOETRAIN_NODE"] = "ab"[rank]
    return H.train(rank, world, log_dir, ckpt_dir, list(extra) + [f"checkpoint.snapshot_dir={shm}"])


def test_snapshot_replicas_and_recovery(tmp_path):
    shm = tmp_path / "shm"
    first = run_dist(_train, 2, (str(tmp_path / "r1"), str(tmp_path / "ck"), str(shm), EXTRA))[0]
    nodes = {n: shm / f"uid{os.getuid()}" / "tiny" / n for n in "ab"}
    for n, d in nodes.items():        # KEEP=2 newest snapshots per node, each with both ranks' files
        steps = sorted(os.listdir(d))
        assert steps == ["step_00000006", "step_00000008"], (n, steps)
        files = set(os.listdir(d / steps[0]))
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"} <= files, (n, files)
    manifest = json.loads((nodes["a"] / "step_00000006" / "manifest.json").read_text())
    assert manifest["snapshot"] and manifest["step"] == 6 and manifest["world"] == 2 and manifest["run"]
    assert oct(os.stat(shm / f"uid{os.getuid()}").st_mode & 0o777) == "0o700"
    # node b lost its memory; the newest snapshot is gone everywhere
    shutil.rmtree(nodes["b"])
    shutil.rmtree(nodes["a"] / "step_00000008")
    second = run_dist(_train, 2, (str(tmp_path / "r2"), str(tmp_path / "ck"), str(shm), EXTRA))[0]
    assert sorted(second) == [7, 8]
    assert [second[s] for s in (7, 8)] == [first[s] for s in (7, 8)]
    assert (nodes["b"] / "step_00000006" / "__0_0.distcp").is_file()      # completed on node b again
    # another run (other seed) with the same name and dirs does not take these snapshots: it starts
    # from step 0; a fresh start (resume=none) wipes them
    third = run_dist(_train, 2, (str(tmp_path / "r3"), str(tmp_path / "ck"), str(shm), EXTRA + ["train.seed=7"]))[0]
    assert sorted(third) == list(range(1, 9))
    run_dist(_train, 2, (str(tmp_path / "r4"), str(tmp_path / "ck"), str(shm),
                         [e for e in EXTRA if e != "checkpoint.resume=auto"] + ["checkpoint.resume=none", "train.steps=1"]))
    assert not any((nodes[n] / "step_00000006").exists() for n in "ab")


def test_unwritable_snapshot_dir_skips_snapshots_and_trains_on(tmp_path):
    """snapshot_dir under a regular file: every snapshot is skipped with a warning, on every rank
    alike, and the run trains to the end."""
    (tmp_path / "afile").write_text("x")
    got = run_dist(_train, 2, (str(tmp_path / "r"), str(tmp_path / "ck"), str(tmp_path / "afile" / "shm"), EXTRA))[0]
    assert sorted(got) == list(range(1, 9))
