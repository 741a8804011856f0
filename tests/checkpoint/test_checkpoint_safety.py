"""Crash safety and damaged checkpoints: atomic commit, fallback under resume=auto, retention, and
one clear line with exit code 2 from the CLI for every kind of bad checkpoint."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpt_helpers as H
from _faulty_main import CRASH_EXIT_CODE
from moetrain.checkpoint import Checkpointer, CheckpointError
from moetrain.checkpoint import store
from moetrain.data import load_token_data
from moetrain.train.loop import build_trainer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A world-1 run with checkpoints at steps 2 and 4: (checkpoint dir, losses)."""
    root = tmp_path_factory.mktemp("good")
    losses = H.train(0, 1, str(root / "runs"), str(root / "ckpt"), ["train.steps=4", "checkpoint.every=2"])
    return root / "ckpt", losses


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _resume_in_process(ckpt_dir, resume="auto", extra=()):
    """Build a world-1 trainer and apply checkpoint.resume; returns (trainer, log lines)."""
    lines = []
    cfg = H.make_cfg("unused", str(ckpt_dir), [f"checkpoint.resume={resume}"] + list(extra))
    par = H.parallel_for(cfg, 0, 1)
    trainer = build_trainer(cfg, par, load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size))
    Checkpointer(cfg, par, log=lines.append).resume(trainer)
    return trainer, lines


@pytest.mark.slow
def test_bad_checkpoints_exit_2_with_one_line(good, tmp_path):
    ckpt, _ = good
    step4 = ckpt / "step_00000004"
    missing_shard = _copy(step4, tmp_path / "missing_shard")
    os.remove(missing_shard / "__0_0.distcp")
    truncated = _copy(step4, tmp_path / "truncated")
    _truncate(truncated / "__0_0.distcp")
    no_manifest = _copy(step4, tmp_path / "no_manifest")
    os.remove(no_manifest / "manifest.json")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("hello")
    (unrelated / "model.bin").write_bytes(b"\0" * 100)
    cases = {
        "missing shard": ([f"checkpoint.resume={missing_shard}"], "file __0_0.distcp listed in manifest.json is missing"),
        "truncated": ([f"checkpoint.resume={truncated}"], "file __0_0.distcp is truncated"),
        "no manifest": ([f"checkpoint.resume={no_manifest}"], "manifest.json is missing"),
        "unrelated": ([f"checkpoint.resume={unrelated}"], "not a moetrain checkpoint"),
        "wrong shape": ([f"checkpoint.resume={step4}", "model.dim=64"],
                        "tensor model/embed.weight has shape [256, 32] in the checkpoint but [256, 64] in the model"),
        "mix runs": (["checkpoint.resume=none", "checkpoint.every=2"], "already holds checkpoints"),
    }
    procs = {}
    for name, (args, _) in cases.items():
        run = tmp_path / name.replace(" ", "_")
        procs[name] = H.start_cli(H.overrides(run, ckpt if name == "mix runs" else run / "ckpt", ["train.steps=6"] + args))
    results = dict(zip(procs, H.run_many(list(procs.values()))))
    for name, (code, _, err) in results.items():
        want = cases[name][1]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
        assert lines[-1].startswith("moetrain: error: ") and want in lines[-1], f"{name}: {lines[-1]}"
        assert sum(ln.startswith("moetrain: error") for ln in lines) == 1
    assert "model.dim 32 -> 64" in results["wrong shape"][2]


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    """The process dies inside the save of step 4 — after the shards, after the manifest, after the
    rename: step 2 stays loadable and resume=auto picks the newest COMPLETE checkpoint. Then the
    crashed run is started again and finishes with the losses it had before the crash."""
    phases = ("written", "manifest", "renamed")
    args = {ph: H.overrides(tmp_path / ph / "runs", tmp_path / ph / "ckpt",
                            ["train.steps=6", "checkpoint.every=2", "checkpoint.resume=auto"]) for ph in phases}
    procs = [H.start_cli(args[ph], fault=("--crash", f"{ph}@4")) for ph in phases]
    for ph, (code, _, err) in zip(phases, H.run_many(procs)):
        assert code == CRASH_EXIT_CODE, f"{ph}: {err[-3000:]}"
        ckpt = tmp_path / ph / "ckpt"
        want = 4 if ph == "renamed" else 2
        assert [c.step for c in store.find_complete(str(ckpt))[0]] == ([4, 2] if ph == "renamed" else [2]), ph
        assert store.read_latest(str(ckpt)).endswith("step_00000002"), ph   # `latest` is updated last
        assert os.path.isdir(store.tmp_dir_for(str(ckpt), 4)) == (ph != "renamed"), ph
        if ph != "written":
            trainer, lines = _resume_in_process(ckpt, "auto", ["train.steps=6"])
            assert trainer.state.step == want, ph
            assert not os.path.exists(store.tmp_dir_for(str(ckpt), 4)), "leftovers of the crashed save are removed"
            assert any("removed leftovers" in ln for ln in lines) == (ph != "renamed"), (ph, lines)

    before = H.losses(tmp_path / "written" / "runs")       # steps 1..4 were logged before the crash
    (code, out, err), = H.run_many([H.start_cli(args["written"])])
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "step_00000002" in out, out
    after = H.losses(tmp_path / "written" / "runs")
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert [after[s] for s in (3, 4)] == [before[s] for s in (3, 4)]    # bitwise
    assert [c.step for c in store.find_complete(str(tmp_path / "written" / "ckpt"))[0]] == [6, 4, 2]


def test_auto_falls_back_past_damaged_checkpoints(good, tmp_path):
    ckpt, _ = good
    # newest truncated: caught by the file checks
    d1 = _copy(ckpt, tmp_path / "a")
    _truncate(d1 / "step_00000004" / "__0_0.distcp")
    trainer, lines = _resume_in_process(d1)
    assert trainer.state.step == 2
    assert any("warning: skipping incomplete or corrupt checkpoint" in ln and "step_00000004" in ln for ln in lines)
    # newest has the right sizes but garbage bytes: its CRC-32 does not match, skipped by name
    d2 = _copy(ckpt, tmp_path / "b")
    shard = d2 / "step_00000004" / "__0_0.distcp"
    shard.write_bytes(os.urandom(os.path.getsize(shard)))
    trainer, lines = _resume_in_process(d2)
    assert trainer.state.step == 2
    assert any("skipping" in ln and "__0_0.distcp is corrupt (CRC-32" in ln for ln in lines), lines
    # the same garbage with the manifest's CRC-32 rewritten to match it (a tool that "fixed" the
    # manifest): caught while reading, every rank falls back
    manifest = d2 / "step_00000004" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["crc32"]["__0_0.distcp"] = store.file_crc32(str(shard))
    manifest.write_text(json.dumps(m))
    trainer, lines = _resume_in_process(d2)
    assert trainer.state.step == 2
    assert any("reading failed" in ln and "falling back" in ln for ln in lines), lines
    # nothing complete at all: auto starts from step 0, an explicit path is an error
    d3 = tmp_path / "c"
    d3.mkdir()
    trainer, lines = _resume_in_process(d3)
    assert trainer.state.step == 0
    with pytest.raises(CheckpointError, match="no such file or directory"):
        _resume_in_process(d3, str(d3 / "step_00000009"))


def _tiny_checkpoint(root, step):
    tmp = store.tmp_dir_for(str(root), step)
    store.save_dcp({"model/x": torch.full((4,), float(step)), "train/step": torch.tensor(step)}, tmp, None)
    return store.commit(tmp, str(root), step, {})


def test_retention_never_deletes_the_only_complete_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        _tiny_checkpoint(tmp_path, step)
    assert store.prune(str(tmp_path), keep_last=2, newest_step=4) == [str(tmp_path / f"step_0000000{s}") for s in (2, 1)]
    _truncate(tmp_path / "step_00000004" / "__0_0.distcp")       # damaged newest does not count
    assert store.prune(str(tmp_path), keep_last=1, newest_step=4) == []
    assert [c.step for c in store.find_complete(str(tmp_path))[0]] == [3]
    # re-saving an existing step swaps it atomically; newer checkpoints are never pruned
    _tiny_checkpoint(tmp_path, 4)
    _tiny_checkpoint(tmp_path, 2)
    assert store.prune(str(tmp_path), keep_last=1, newest_step=2) == []
    assert [c.step for c in store.find_complete(str(tmp_path))[0]] == [4, 3, 2]


def test_a_flipped_bit_is_caught_by_crc_and_names_the_file(good, tmp_path):
    """Same size, one bit different: an explicit resume refuses it in one line naming the file."""
    ckpt, _ = good
    step4 = _copy(ckpt / "step_00000004", tmp_path / "flip")
    shard = step4 / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"file __0_0.distcp is corrupt \(CRC-32"):
        _resume_in_process(tmp_path / "unused_ckpt", str(step4))


def test_stale_cleanup_removes_only_our_own_leftovers(tmp_path):
    ours = [".tmp-step_00000030", ".old-step_00000010", "latest.tmp"]
    theirs = [".tmp-notes.txt", ".old-photos", ".tmp-step_12", "tmp-step_00000030"]
    for name in ours + theirs:
        (tmp_path / name).mkdir() if "notes" not in name and name != "latest.tmp" else (tmp_path / name).write_text("x")
    assert store.remove_stale(str(tmp_path)) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)


def test_resume_never_mixes_two_runs_in_one_checkpoint_dir(good, tmp_path):
    """checkpoint.dir holds run X. While saving there, resuming run Y's checkpoint (which would
    replace X's step dirs one by one) and rewinding to an older step of X (which would leave X's
    abandoned newer steps for resume=auto to pick later) are refused; the newest one is fine."""
    ckpt, _ = good
    x = _copy(ckpt, tmp_path / "x")
    y = _copy(ckpt, tmp_path / "y")
    before = sorted(os.listdir(x / "step_00000004"))
    with pytest.raises(CheckpointError, match="belong to another run"):
        _resume_in_process(x, str(y / "step_00000002"), ["checkpoint.every=2"])
    with pytest.raises(CheckpointError, match="newest step_00000004.*is older"):
        _resume_in_process(x, str(x / "step_00000002"), ["checkpoint.every=2"])
    assert sorted(os.listdir(x / "step_00000004")) == before
    for newest in (x / "step_00000004", x / "latest", x):
        trainer, _ = _resume_in_process(x, str(newest), ["checkpoint.every=2"])
        assert trainer.state.step == 4
    for path in (y / "step_00000002", x / "step_00000002"):     # not saving: nothing to overwrite
        trainer, _ = _resume_in_process(x, str(path))
        assert trainer.state.step == 2


def test_resume_accepts_the_latest_pointer_file(good, tmp_path):
    ckpt, _ = good
    trainer, lines = _resume_in_process(tmp_path / "unused", str(ckpt / "latest"))
    assert trainer.state.step == 4 and any("step_00000004" in ln for ln in lines)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="does not name a step_"):
        _resume_in_process(tmp_path / "unused", str(bad / "latest"))


def test_metrics_trim_on_resume_skips_garbled_lines(tmp_path):
    """A crash can leave a cut line, a non-object or invalid UTF-8: resume drops them, keeps steps
    up to the checkpoint, and never raises."""
    from moetrain.train.outputs import truncate_metrics as _truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 5.0}\n[1]\n\xff\xfe{"step"\n{"step": 2, "loss": 4.0}\n'
                     b'"text"\n{"step": 3, "loss": 3.0}\n{"step": 2.5}\n{"step": 4, "lo')
    _truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
