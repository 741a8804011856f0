"""In-memory snapshots with a peer replica (checkpoint.snapshot_every, checkpoint/snapshot.py): two
ranks posing as two nodes (MOETRAIN_NODE a and b); each node's directory holds both ranks' files
after a save; with node b's memory gone and node a's copy of the newest snapshot corrupted, a
restart drops that one, completes the older snapshot on both nodes from node a's copy and continues
it exactly."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import ckpt_helpers as H
from moetrain.checkpoint import store
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
    # node b lost its memory; node a's copy of the newest snapshot has one flipped byte (same size:
    # only the CRC-32 check after completing it finds it): dropped, the older one is resumed
    shutil.rmtree(nodes["b"])
    bad = nodes["a"] / "step_00000008" / "__1_0.distcp"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    second = run_dist(_train, 2, (str(tmp_path / "r2"), str(tmp_path / "ck"), str(shm), EXTRA))[0]
    assert sorted(second) == [7, 8]
    assert [second[s] for s in (7, 8)] == [first[s] for s in (7, 8)]
    assert (nodes["b"] / "step_00000006" / "__0_0.distcp").is_file()      # completed on node b again
    for n in "ab":                    # step 8 saved again by the resumed run, intact
        store.verify(str(nodes[n] / "step_00000008"), contents=True)
    # another run (other seed) with the same name and dirs does not take these snapshots: it starts
    # from step 0; a fresh start (resume=none) wipes them
    third = run_dist(_train, 2, (str(tmp_path / "r3"), str(tmp_path / "ck"), str(shm), EXTRA + ["train.seed=7"]))[0]
    assert sorted(third) == list(range(1, 9))
    for n in "ab":                    # its own snapshots replaced the other run's (newer-numbered) ones
        assert sorted(os.listdir(nodes[n])) == ["step_00000006", "step_00000008"]
        for step in (6, 8):
            m = json.loads((nodes[n] / f"step_{step:08d}" / "manifest.json").read_text())
            assert m["run"] != manifest["run"], (n, step)
    run_dist(_train, 2, (str(tmp_path / "r4"), str(tmp_path / "ck"), str(shm),
                         [e for e in EXTRA if e != "checkpoint.resume=auto"] + ["checkpoint.resume=none", "train.steps=1"]))
    assert not any((nodes[n] / "step_00000006").exists() for n in "ab")


def test_unwritable_snapshot_dir_skips_snapshots_and_trains_on(tmp_path):
    """snapshot_dir under a regular file: every snapshot is skipped with a warning, on every rank
    alike, and the run trains to the end."""
    (tmp_path / "afile").write_text("x")
    got = run_dist(_train, 2, (str(tmp_path / "r"), str(tmp_path / "ck"), str(tmp_path / "afile" / "shm"), EXTRA))[0]
    assert sorted(got) == list(range(1, 9))


def _train_named(rank, world, log_dir, ckpt_dir, shm, names):
    from moetrain.checkpoint import CheckpointError
    os.environ["MOETRAIN_NODE"] = names[rank]
    try:
        H.train(rank, world, log_dir, ckpt_dir, EXTRA + [f"checkpoint.snapshot_dir={shm}"])
    except CheckpointError as exc:
        return str(exc)
    return "trained"


def test_unusable_node_name_is_one_error_on_every_rank(tmp_path):
    """A node name that would leave snapshot_dir ($MOETRAIN_NODE '../x') is refused before any file
    is written, with the same line on every rank (the name is one rank's environment)."""
    got = run_dist(_train_named, 2, (str(tmp_path / "r"), str(tmp_path / "ck"), str(tmp_path / "shm"), ["a", "../x"]))
    assert got[0] == got[1] and "rank 1's node name '../x'" in got[0] and "directory name" in got[0], got
    assert not (tmp_path / "x").exists() and not (tmp_path / "shm" / "x").exists()


def test_default_node_name_is_host_and_boot(monkeypatch):
    from moetrain.checkpoint.lock import boot_id
    from moetrain.checkpoint.snapshot import NODE_NAME, node_id
    monkeypatch.delenv("MOETRAIN_NODE", raising=False)
    name = node_id()
    assert NODE_NAME.fullmatch(name)
    if boot_id():
        assert name.endswith("-" + boot_id()[:8])


def _train_in(rank, world, log_dir, ckpt_dir, cwd):
    os.environ["MOETRAIN_NODE"] = "n"
    os.chdir(cwd[rank])
    return H.train(rank, world, log_dir, ckpt_dir, EXTRA + ["checkpoint.snapshot_dir=shm"])


def test_two_machines_with_one_node_name_skip_snapshots(tmp_path):
    """Two "machines" (ranks whose relative snapshot_dir is a different directory) given one node
    name: the second rank cannot see the snapshot its node leader committed; every snapshot is
    skipped (none is kept that the ring never replicated) and training goes on."""
    cwd = [tmp_path / "x", tmp_path / "y"]
    for d in cwd:
        d.mkdir()
    got = run_dist(_train_in, 2, (str(tmp_path / "r"), str(tmp_path / "ck"), [str(d) for d in cwd]))[0]
    assert sorted(got) == list(range(1, 9))
    for d in cwd:
        root = d / "shm" / f"uid{os.getuid()}" / "tiny" / "n"
        assert not root.is_dir() or not [p for p in os.listdir(root) if p.startswith("step_")], os.listdir(root)


def _train_in_named(rank, world, log_dir, ckpt_dir, cwd, names):
    os.environ["MOETRAIN_NODE"] = names[rank]
    os.chdir(cwd[rank])
    return H.train(rank, world, log_dir, ckpt_dir, EXTRA + ["checkpoint.snapshot_dir=shm"])


def test_recovery_needs_every_rank_to_see_its_leaders_verified_copy(tmp_path):
    """Snapshots made as nodes a and b in one directory; then rank 1 runs on "another machine"
    (its relative snapshot_dir elsewhere, holding an identical copy) under node name a too: it
    cannot see the token rank 0 wrote into the copy it verified, so no snapshot is resumed and
    the run starts over instead of loading files nobody checked."""
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir()
    run_dist(_train_in_named, 2, (str(tmp_path / "r1"), str(tmp_path / "ck"), [str(x), str(x)], ["a", "b"]))
    rel = Path("shm") / f"uid{os.getuid()}" / "tiny" / "a"
    shutil.copytree(x / rel, y / rel)
    got = run_dist(_train_in_named, 2, (str(tmp_path / "r2"), str(tmp_path / "ck"), [str(x), str(y)], ["a", "a"]))[0]
    assert sorted(got) == list(range(1, 9))
