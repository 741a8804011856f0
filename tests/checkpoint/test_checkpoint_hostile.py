"""A checkpoint never runs code (issue 15): crafted checkpoints are refused, in one line, by every
reader, and the code they carry never runs.

Two hostile checkpoints, both with manifests whose sizes and CRC-32s match (the attacker rewrites
the manifest too, so integrity checks pass and only the restricted reading stops them):
  hostile_metadata  `.metadata` is a pickle whose __reduce__ creates a marker file, then returns
                    the real metadata (stock DCP's FileSystemReader.read_metadata runs it);
  hostile_entry     a pickled object committed through store.commit under an RNG key (stock DCP
                    reads non-tensor entries with torch.load(weights_only=False): runs it).
Each builder first proves its file is a working exploit against stock torch (on a probe copy),
then every path that reads checkpoints meets the real one: resume=<path>, auto, none (on that
dir), <dir>/latest, every tool, retention, at world 1 (CLI) and world 2; the marker never appears.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckpt_helpers as H
from _dist import run_dist
from moetrain.checkpoint import CheckpointError
from moetrain.checkpoint import state as S
from moetrain.checkpoint import store
from moetrain.checkpoint.convert import load_all
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

TOOLS = H.REPO / "tools"
_RESERVED = ("format", "format_version", "step", "created", "files", "crc32", "save_s")


class _Payload:
    """Unpickling this runs `touch marker` (through builtins.eval: importable anywhere)."""

    def __init__(self, marker, then: bytes = b""):
        self.marker, self.then = str(marker), then

    def __reduce__(self):
        expr = f"__import__('pathlib').Path({self.marker!r}).touch()"
        if self.then:        # ... and then evaluate to the real object, so nothing looks wrong
            expr = f"{expr} or __import__('pickle').loads({self.then!r})"
        return eval, (expr,)


def _reseal(step_dir) -> None:
    """Rewrite the manifest's sizes and CRC-32s to match the files (what an attacker does)."""
    mpath = os.path.join(step_dir, store.MANIFEST)
    with open(mpath) as f:
        m = json.load(f)
    for rel in m["files"]:
        m["files"][rel] = os.path.getsize(os.path.join(step_dir, rel))
        m["crc32"][rel] = store.file_crc32(os.path.join(step_dir, rel))
    with open(mpath, "w") as f:
        json.dump(m, f)


def make_hostile_metadata(src_step, dst, marker) -> str:
    shutil.copytree(src_step, dst)
    real = open(os.path.join(dst, ".metadata"), "rb").read()
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        f.write(__import__("pickle").dumps(_Payload(marker, real), protocol=4))
    _reseal(dst)
    return str(dst)


def make_hostile_entry(src_step, root, marker, key: str = "rng/rank_00000/python") -> str:
    """Commit (store.commit, as training does) the tensors of src_step plus a pickled object under
    `key`, as step 4 of checkpoint dir `root`."""
    info = store.verify(str(src_step))
    flat = load_all(info)
    flat[key] = _Payload(marker)
    with pytest.raises(CheckpointError, match="not a tensor"):      # our writer never pickles
        store.save_dcp(flat, str(root / "never"), None)
    tmp = store.tmp_dir_for(str(root), info.step)
    # the stock writer pickles the non-tensor entry (torch.save into the shard)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True), no_dist=True)
    fields = {k: v for k, v in info.manifest.items() if k not in _RESERVED}
    return store.commit(tmp, str(root), info.step, fields)


def _stock_read_runs_it(step_dir, marker, key=None) -> bool:
    """The exploit is real: stock DCP reading (metadata, or the entry `key`) creates the marker."""
    reader = dcp.FileSystemReader(step_dir)
    if key is None:
        reader.read_metadata()
    else:
        flat = {key: b""}
        dcp.load(flat, storage_reader=reader, no_dist=True)
    return os.path.exists(marker)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A good world-1 run (steps 2 and 4) and, next to it, the two hostile checkpoints: each alone
    (hostile_*/step_00000004) and as the newest of a copy of the good run (dir_*)."""
    root = tmp_path_factory.mktemp("hostile")
    H.train(0, 1, str(root / "runs"), str(root / "good"), ["train.steps=4", "checkpoint.every=2"])
    good4 = root / "good" / "step_00000004"
    marker = root / "PWNED"
    out = {"root": root, "good": root / "good", "marker": marker}

    probe = root / "probe_md"
    make_hostile_metadata(good4, probe, root / "probe_md_ran")
    assert _stock_read_runs_it(str(probe), root / "probe_md_ran"), "the crafted .metadata is not an exploit"
    probe_root = root / "probe_entry"
    probe_root.mkdir()
    path = make_hostile_entry(good4, probe_root, root / "probe_entry_ran")
    assert _stock_read_runs_it(path, root / "probe_entry_ran", "rng/rank_00000/python"), \
        "the crafted entry is not an exploit"

    for kind in ("metadata", "entry"):
        d = root / f"dir_{kind}"
        shutil.copytree(root / "good", d, ignore=shutil.ignore_patterns("step_00000004"))
        alone = root / f"hostile_{kind}"
        alone.mkdir()
        if kind == "metadata":
            make_hostile_metadata(good4, d / "step_00000004", marker)
            make_hostile_metadata(good4, alone / "step_00000004", marker)
        else:
            make_hostile_entry(good4, d, marker)
            make_hostile_entry(good4, alone, marker)
        out[kind] = alone / "step_00000004"
        out[f"dir_{kind}"] = d
    garbage = shutil.copytree(root / "good", root / "garbage_latest")
    (garbage / "latest").write_bytes(b"\xff\xfe\x00\x9c" + os.urandom(300))
    out["garbage_latest"] = garbage / "latest"
    assert not marker.exists()
    return out


def _one_line(code, err, want_code, words, prefix, name):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == want_code, f"{name}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
    assert sum(ln.startswith(prefix) for ln in lines) == 1 and lines[-1].startswith(prefix), f"{name}:\n{err[-3000:]}"
    assert all(w in lines[-1] for w in words), f"{name}: {lines[-1]}"


def _run_tools(cmds: dict, timeout_s=180) -> dict:
    procs = {name: subprocess.Popen([sys.executable, *map(str, cmd)], cwd=H.REPO, env=H.cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True) for name, cmd in cmds.items()}
    return dict(zip(procs, H.run_many(list(procs.values()), timeout_s)))


GARBAGE = ["latest: does not name a step_* directory"]
REFUSED = {"metadata": ["file .metadata is refused", "builtins.eval"],
           "entry": ["lists entry rng/rank_00000/python as a pickled object", "refused"]}


def test_training_refuses_hostile_checkpoints(ckpts, tmp_path):
    """CLI at world 1: resume=<step dir>, =<dir>/latest, auto, and none (saving on) on the directory
    holding it: exit 2, one line naming the file, the payload never runs. Also a `latest` holding
    garbage bytes: one line."""
    cases = {}
    saving_dirs = []
    for kind in ("metadata", "entry"):
        d = ckpts[f"dir_{kind}"]
        cases[f"{kind} path"] = (tmp_path / f"c_{kind}", [f"checkpoint.resume={ckpts[kind]}"])
        cases[f"{kind} latest"] = (tmp_path / f"c2_{kind}", [f"checkpoint.resume={d / 'latest'}"])
        for resume in ("auto", "none"):     # saving runs: one copy each (a shared dir is locked)
            own = shutil.copytree(d, tmp_path / f"{kind}_{resume}")
            saving_dirs.append(own)
            cases[f"{kind} {resume}"] = (own, [f"checkpoint.resume={resume}", "checkpoint.every=2"])
    cases["garbage latest"] = (tmp_path / "c3", [f"checkpoint.resume={ckpts['garbage_latest']}"])
    procs = {name: H.start_cli(H.overrides(tmp_path / "runs" / name.replace(" ", "_"), ck, ["train.steps=6"] + extra))
             for name, (ck, extra) in cases.items()}
    for name, (code, _, err) in zip(procs, H.run_many(list(procs.values()), 180)):
        kind = name.split()[0]
        _one_line(code, err, 2, GARBAGE if kind == "garbage" else REFUSED[kind] + ["step_00000004"],
                  "moetrain: error: ", name)
    assert not ckpts["marker"].exists(), "a hostile checkpoint ran its code"
    for d in [ckpts["dir_metadata"], ckpts["dir_entry"]] + saving_dirs:    # nothing deleted or overwritten
        assert sorted(os.listdir(d)) == ["latest", "step_00000002", "step_00000004"], d


def test_tools_refuse_hostile_checkpoints(ckpts, tmp_path):
    cmds = {}
    for kind in ("metadata", "entry"):
        p = ckpts[kind]
        cmds[f"{kind} inspect"] = [TOOLS / "ckpt_inspect.py", p]
        cmds[f"{kind} inspect dir"] = [TOOLS / "ckpt_inspect.py", ckpts[f"dir_{kind}"], "--verify"]
        cmds[f"{kind} consolidate"] = [TOOLS / "ckpt_inspect.py", p, "-q", "--consolidate", tmp_path / f"{kind}.pt"]
        cmds[f"{kind} upgrade"] = [TOOLS / "ckpt_inspect.py", p, "--upgrade", tmp_path / f"up_{kind}"]
        cmds[f"{kind} ensemble"] = [TOOLS / "ensemble_eval.py", ckpts["good"], p, "--device", "cpu"]
        cmds[f"{kind} upcycle"] = [TOOLS / "upcycle.py", p, "--out", tmp_path / f"upc_{kind}", "moe.num_experts=4"]
        cmds[f"{kind} depth"] = [TOOLS / "depth_upscale.py", p, "--drop", "1", "--out", tmp_path / f"dus_{kind}"]
    cmds["garbage latest"] = [TOOLS / "ckpt_inspect.py", ckpts["garbage_latest"]]
    for name, (code, _, err) in _run_tools(cmds).items():
        kind, tool = name.split()[0], name.split()[1]
        prog = {"inspect": "ckpt_inspect", "consolidate": "ckpt_inspect", "upgrade": "ckpt_inspect",
                "ensemble": "ensemble_eval", "upcycle": "upcycle", "depth": "depth_upscale",
                "latest": "ckpt_inspect"}[tool]
        _one_line(code, err, 1, GARBAGE if kind == "garbage" else REFUSED[kind], f"{prog}: error: ", name)
    assert not ckpts["marker"].exists(), "a hostile checkpoint ran its code"
    assert not any(p.name.startswith(("up", "dus", "upc")) and any(p.iterdir()) for p in tmp_path.iterdir()
                   if p.is_dir())


def _resume_all(rank, world, cases):
    return [H.try_resume(rank, world, ck, resume, extra) for ck, resume, extra in cases]


def test_every_rank_refuses_at_world_2(ckpts, tmp_path):
    """World 2 (ep 2): both ranks raise the same line, for both hostile kinds and for an RNG state
    of rank 1 only that is not a valid state (checked after reading, agreed by all ranks)."""
    w2 = tmp_path / "w2"
    run_dist(H.train, 2, (str(w2 / "runs"), str(w2 / "ck"), ["parallel.ep=2", "train.steps=2", "checkpoint.every=2"]))
    bad_rng = shutil.copytree(w2 / "ck" / "step_00000002", tmp_path / "bad_rng" / "step_00000002")
    flat = load_all(store.verify(str(bad_rng)))
    flat[S.rng_key(1, "numpy")][-2] = 10 ** 6          # numpy's pos: an index far outside its key
    shutil.rmtree(bad_rng)
    tmp = store.tmp_dir_for(str(bad_rng.parent), 2)
    store.save_dcp(flat, tmp, None)
    store.commit(tmp, str(bad_rng.parent), 2, {k: v for k, v in json.loads(
        (w2 / "ck" / "step_00000002" / "manifest.json").read_text()).items() if k not in _RESERVED})
    ep2 = ["parallel.ep=2"]
    cases = [(str(tmp_path / "u1"), str(ckpts["metadata"]), ep2),
             (str(ckpts["dir_entry"]), "auto", ep2),
             (str(tmp_path / "u2"), str(bad_rng), ep2)]
    r0, r1 = run_dist(_resume_all, 2, (cases,))
    assert r0 == r1, (r0, r1)
    assert all(w in r0[0] for w in REFUSED["metadata"]), r0[0]
    assert all(w in r0[1] for w in REFUSED["entry"]), r0[1]
    assert "RNG entry rng/rank_00001/numpy" in r0[2] and "not a valid state" in r0[2], r0[2]
    assert not ckpts["marker"].exists()


def test_retention_refuses_and_keeps_everything(ckpts, tmp_path):
    for kind in ("metadata", "entry"):
        d = shutil.copytree(ckpts[f"dir_{kind}"], tmp_path / kind)
        shutil.copytree(d / "step_00000002", d / "step_00000006")      # the save just committed
        before = sorted(os.listdir(d))
        with pytest.raises(store.CheckpointRefused, match="step_00000004"):
            store.prune(str(d), keep_last=1, newest_step=6)
        assert sorted(os.listdir(d)) == before
    assert not ckpts["marker"].exists()


def test_hostile_tensor_data_is_refused_by_torch_weights_only(ckpts, tmp_path, monkeypatch):
    """A tensor entry whose bytes are a pickle with a payload: read with weights_only=True (DCP's
    own tensor path, kept by SafeReader), so reading fails and resume=auto falls back past it."""
    marker = tmp_path / "TENSOR_RAN"
    info = store.verify(str(ckpts["good"] / "step_00000004"))
    flat = load_all(info)
    flat[S.TOKENS_KEY] = torch.tensor(-777, dtype=torch.int64)
    real_save = torch.save

    def save(obj, f, *a, **kw):        # DCP's writer calls torch.save(tensor, stream) per item
        if torch.is_tensor(obj) and obj.dim() == 0 and int(obj) == -777:
            obj = _Payload(marker)
        return real_save(obj, f, *a, **kw)

    d = shutil.copytree(ckpts["good"], tmp_path / "ck", ignore=shutil.ignore_patterns("step_00000004"))
    tmp = store.tmp_dir_for(str(d), 4)
    monkeypatch.setattr(torch, "save", save)
    store.save_dcp(flat, tmp, None)
    monkeypatch.setattr(torch, "save", real_save)
    store.commit(tmp, str(d), 4, {k: v for k, v in info.manifest.items() if k not in _RESERVED})
    with pytest.raises(CheckpointError, match="reading failed"):
        load_all(store.verify(str(d / "step_00000004")))
    from test_checkpoint_safety import _resume_in_process
    trainer, lines = _resume_in_process(d)
    assert trainer.state.step == 2 and any("falling back" in ln for ln in lines), lines
    assert not marker.exists()


def test_user_step_directory_is_never_replaced(tmp_path):
    """A step_NNNNNNNN directory without our manifest (the user's) is never swapped out by a save of
    that step: one line naming it, and it is left as it was."""
    root = tmp_path / "ck"
    mine = root / "step_00000004"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my results")
    tmp = store.tmp_dir_for(str(root), 4)
    store.save_dcp({"model/x": torch.ones(2), S.STEP_KEY: torch.tensor(4)}, tmp, None)
    with pytest.raises(CheckpointError, match=r"step_00000004 already exists and is not a moetrain checkpoint"):
        store.commit(tmp, str(root), 4, {})
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my results"
    # through training: refused before the first step (a run saving step 4 there), with one line;
    # a run that never saves step 4 does not mind it
    # one after the other: two saving runs on one checkpoint.dir would meet its lock
    (code, _, err), (code3, _, err3) = [
        H.run_many([H.start_cli(H.overrides(tmp_path / f"runs{n}", root, [f"train.steps={n}", f"checkpoint.every={n}"]))])[0]
        for n in (4, 3)]
    _one_line(code, err, 2, ["step_00000004 is not a moetrain checkpoint", "this run saves step 4 there"],
              "moetrain: error: ", "cli")
    assert code3 == 0, err3[-3000:]
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    assert os.listdir(mine) == ["notes.txt"]


def test_old_format_is_refused_and_upgrades_without_unpickling(ckpts, tmp_path):
    """format_version 1 (RNG states pickled, here a payload): refused by resume and tools with one
    line saying how to convert; the conversion copies every tensor, never reads the pickle, and
    the result resumes at step 4."""
    from test_checkpoint_safety import _resume_in_process
    marker = tmp_path / "OLD_RAN"
    root = tmp_path / "old"
    root.mkdir()
    info = store.verify(str(ckpts["good"] / "step_00000004"))
    flat = {k: v for k, v in load_all(info).items() if not k.startswith("rng/")}
    flat["rng/rank_00000"] = _Payload(marker)
    tmp = store.tmp_dir_for(str(root), 4)
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True), no_dist=True)
    old = store.commit(tmp, str(root), 4, {k: v for k, v in info.manifest.items() if k not in _RESERVED})
    m = json.loads(open(os.path.join(old, "manifest.json")).read())
    m["format_version"] = 1
    open(os.path.join(old, "manifest.json"), "w").write(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"format_version 1: .*pickled.*refused.*--upgrade"):
        _resume_in_process(tmp_path / "unused", old)
    with pytest.raises(CheckpointError, match=r"format_version 1: "):
        _resume_in_process(root, "auto")
    res = _run_tools({"upgrade": [TOOLS / "ckpt_inspect.py", old, "--upgrade", tmp_path / "new"]})
    assert res["upgrade"][0] == 0, res["upgrade"][2]
    new = store.verify(str(tmp_path / "new" / "step_00000004"), contents=True)
    assert new.manifest["format_version"] == store.FORMAT_VERSION
    assert not any(k.startswith("rng/") for k in new.metadata.state_dict_metadata)
    a, b = load_all(info), load_all(new)
    assert all(torch.equal(a[k], b[k]) for k in b) and set(a) - set(b) == {k for k in a if k.startswith("rng/")}
    trainer, lines = _resume_in_process(tmp_path / "unused2", str(tmp_path / "new"))
    assert trainer.state.step == 4
    assert not marker.exists()
