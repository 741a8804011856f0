"""tools/ckpt_inspect.py: listing, --verify, --consolidate and --from-consolidated round trips."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import ckpt_helpers as H
from moetrain.checkpoint import store
from moetrain.model.transformer import Transformer
from _tools import load_tool

pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop


def _tool():
    return load_tool("ckpt_inspect")


def test_list_and_verify(w4_run, tmp_path, capsys):
    _, ckpt = w4_run
    tool = _tool()
    assert tool.main([str(ckpt), "--verify"]) == 0         # a checkpoint.dir: its newest complete one
    out = capsys.readouterr().out
    assert "step 10" in out and "'ep': 4" in out and "world 4" in out
    assert "OK: " in out
    row = next(ln for ln in out.splitlines() if "model/layers.1.ffn.experts.w2/expert_7 " in ln)
    assert row.split()[1:] == ["32x32", "float32", "7"]
    assert sum(f.endswith(".distcp") for f in os.listdir(ckpt / "step_00000010")) == 4   # every rank wrote
    # dense tensors (a third of the bytes here) are written once, not by all 4 ranks: the shards
    # hold little more than one copy of everything (DCP adds ~1.5 KB per entry)
    info = store.verify(str(ckpt / "step_00000010"))
    tensor_bytes = sum(math.prod(md.size) * md.properties.dtype.itemsize
                       for md in info.metadata.state_dict_metadata.values() if hasattr(md, "size"))
    shard_bytes = sum(v for k, v in info.manifest["files"].items() if k.endswith(".distcp"))
    assert shard_bytes < 1.6 * tensor_bytes, (shard_bytes, tensor_bytes)
    # a damaged copy fails --verify with exit 1 and names the file
    bad = shutil.copytree(ckpt / "step_00000010", tmp_path / "bad")
    with open(bad / "__2_0.distcp", "r+b") as f:
        f.truncate(10)
    assert tool.main([str(bad), "--verify", "-q"]) == 1
    assert "__2_0.distcp is truncated" in capsys.readouterr().err


def test_consolidate_and_back(w4_run, tmp_path):
    _, ckpt = w4_run
    tool = _tool()
    src = store.verify(str(ckpt / "step_00000010"))
    full_pt = tmp_path / "full.pt"
    assert tool.main([src.path, "-q", "--consolidate", str(full_pt)]) == 0
    full = torch.load(full_pt, weights_only=True)     # tensors and plain containers only
    assert full["train"]["step"] == 10 and full["manifest"]["layout"]["ep"] == 4
    assert full["model"]["layers.0.ffn.experts.w1"].shape == (8, 32, 32)
    assert full["optim"]["layers.0.ffn.experts.w1"]["exp_avg"].shape == (8, 32, 32)
    # the model part is a plain full state dict: it loads into a world-1 model as is
    cfg = H.make_cfg("unused", "unused", ["parallel.ep=1"])
    Transformer(cfg).load_state_dict(full["model"], strict=True)

    assert tool.main(["--from-consolidated", str(full_pt), "--out", str(tmp_path / "back")]) == 0
    back = store.verify(str(tmp_path / "back" / "step_00000010"))
    assert back.manifest["converted_from"] == str(full_pt)
    a, b = tool.load_all(src), tool.load_all(back)
    assert sorted(a) == sorted(b)
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_conversion_refusals_are_one_line_and_touch_nothing(w4_run, tmp_path, capsys):
    _, ckpt = w4_run
    tool = _tool()
    full_pt = tmp_path / "full.pt"
    assert tool.main([str(ckpt), "-q", "--consolidate", str(full_pt)]) == 0
    capsys.readouterr()

    def fails(args, words):
        assert tool.main(args) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err

    # an --out that already holds this step (or a newer one) is never replaced
    out = shutil.copytree(ckpt, tmp_path / "out")
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
    fails(["--from-consolidated", str(full_pt), "--out", str(out)], "already holds step_00000010")
    assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
    # garbage and truncated .pt files, and a target directory that does not exist
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    fails(["--from-consolidated", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "o1")],
          "not a readable consolidated checkpoint")
    (tmp_path / "cut.pt").write_bytes(full_pt.read_bytes()[:5000])
    fails(["--from-consolidated", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "o2")],
          "not a readable consolidated checkpoint")
    # a pickle that would run code on load is refused, not executed
    (tmp_path / "evil.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    fails(["--from-consolidated", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o3")],
          "not a readable consolidated checkpoint")
    assert not (tmp_path / "pwned").exists()
    fails([str(ckpt), "-q", "--consolidate", str(tmp_path / "no" / "such" / "x.pt")], "is not a directory")
    fails([str(ckpt), "-q", "--consolidate", str(tmp_path)], "is a directory")
    # files that load (plain dicts and tensors) but are not shaped like a consolidated checkpoint
    one = {"a": torch.ones(2)}
    for i, (obj, words) in enumerate([
            ({"model": 5, "manifest": {}}, "'model' must be"),
            ({"model": {}, "manifest": {}}, "'model' must be"),
            ({"model": one, "manifest": [1]}, "'manifest' must be"),
            ({"model": one, "manifest": {}, "optim": {"b": {}}}, "'optim' names tensors"),
            ({"model": one, "manifest": {}, "train": {"step": "abc"}}, "train.step must be"),
            ({"model": one, "manifest": {}, "train": {"step": -5}}, "train.step must be")]):
        torch.save(obj, tmp_path / f"odd{i}.pt")
        fails(["--from-consolidated", str(tmp_path / f"odd{i}.pt"), "--out", str(tmp_path / f"oo{i}")], words)
        assert not (tmp_path / f"oo{i}").exists()


def test_safetensors_round_trip(w4_run, tmp_path):
    pytest.importorskip("safetensors")
    _, ckpt = w4_run
    tool = _tool()
    out = tmp_path / "full.safetensors"
    assert tool.main([str(ckpt), "-q", "--consolidate", str(out)]) == 0
    assert tool.main(["--from-consolidated", str(out), "--out", str(tmp_path / "back")]) == 0
    a = tool.load_all(store.verify(str(ckpt / "step_00000010")))
    b = tool.load_all(store.verify(str(tmp_path / "back" / "step_00000010")))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
