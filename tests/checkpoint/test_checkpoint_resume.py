"""Exact continuation (bitwise, same layout) and resuming onto other layouts (float tolerance)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import ckpt_helpers as H
from _dist import run_dist
from moetrain.checkpoint import store


def _tail(losses: dict, first: int) -> list:
    return [losses[s] for s in sorted(losses) if s >= first]


def test_resume_is_bitwise_exact_world1(tmp_path):
    """20 steps straight (no checkpointing) == 10 + resume + 10; async saving does not perturb
    training; keep_last retention."""
    extra = ["train.steps=20"] + H.STATEFUL
    ref = H.train(0, 1, str(tmp_path / "ref"), str(tmp_path / "unused"), extra)
    saved = H.train(0, 1, str(tmp_path / "a"), str(tmp_path / "ck"),
                    extra + ["checkpoint.every=5", "checkpoint.keep_last=3", "checkpoint.async_save=true"])
    assert list(saved.values()) == list(ref.values())            # bitwise: == on Python floats
    assert [s for s, _ in store.list_step_dirs(str(tmp_path / "ck"))] == [20, 15, 10]
    assert store.read_latest(str(tmp_path / "ck")).endswith("step_00000020")
    resumed = H.train(0, 1, str(tmp_path / "b"), str(tmp_path / "ck_b"),
                      extra + [f"checkpoint.resume={tmp_path / 'ck' / 'step_00000010'}"])
    assert sorted(resumed) == list(range(11, 21))
    assert _tail(resumed, 11) == _tail(ref, 11)


@pytest.mark.slow
def test_resume_is_bitwise_exact_world2_ep2(w2_straight, tmp_path):
    """Also: the resumed run saves asynchronously, and its step-20 checkpoint equals the one the
    uninterrupted (synchronous) run wrote, tensor for tensor, RNG states included. And before
    training, the same processes meet a truncated checkpoint: both ranks raise the same line."""
    ref, ckpt = w2_straight
    assert sorted(ref) == list(range(1, 21))
    assert [s for s, _ in store.list_step_dirs(str(ckpt))] == [20, 15, 10, 5]
    bad = shutil.copytree(ckpt / "step_00000005", tmp_path / "bad")
    with open(bad / "__1_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(bad / "__1_0.distcp") // 2)
    extra = H.W2_EXTRA + [f"checkpoint.resume={ckpt / 'step_00000010'}", "checkpoint.async_save=true"]
    (err0, resumed), (err1, _) = run_dist(H.bad_then_train, 2, (str(tmp_path / "runs"), str(tmp_path / "ck"),
                                                                 str(bad), extra))
    assert err0 == err1 and "file __1_0.distcp is truncated" in err0, (err0, err1)
    assert sorted(resumed) == list(range(11, 21))
    assert _tail(resumed, 11) == _tail(ref, 11)
    a = load_all(store.verify(str(ckpt / "step_00000020")))
    b = load_all(store.verify(str(tmp_path / "ck" / "step_00000020")))
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert differ == []


@pytest.mark.slow
def test_resume_onto_other_layouts(w4_run, tmp_path):
    """Saved at dp=4 ep=4; resumed at dp=2 ep=2 and at world 1 the loss curve continues."""
    ref, ckpt = w4_run
    step5 = str(ckpt / "step_00000005")
    base = ["train.steps=10", f"checkpoint.resume={step5}"]
    w2 = run_dist(H.train, 2, (str(tmp_path / "w2"), str(tmp_path / "ck2"), base + ["parallel.ep=2"]))[0]
    w1 = H.train(0, 1, str(tmp_path / "w1"), str(tmp_path / "ck1"), base)
    for got in (w2, w1):
        assert sorted(got) == [6, 7, 8, 9, 10]
        torch.testing.assert_close(torch.tensor(_tail(got, 6)), torch.tensor(_tail(ref, 6)), rtol=2e-5, atol=0)


@pytest.mark.slow
def test_peer_tables_reshard(tmp_path):
    """PEER expert tables are row-sharded over ep and saved as DTensors: ep=2 -> world 1."""
    peer = ["moe.layer=peer", "moe.peer.num_keys=4", "moe.peer.heads=2", "moe.peer.top_k=2", "moe.peer.key_dim=8",
            "moe.peer.query_bn=false", "train.steps=4"]
    ref = run_dist(H.train, 2, (str(tmp_path / "a"), str(tmp_path / "ck"),
                                peer + ["parallel.ep=2", "checkpoint.every=2"]))[0]
    got = H.train(0, 1, str(tmp_path / "b"), str(tmp_path / "ck_b"),
                  peer + [f"checkpoint.resume={tmp_path / 'ck' / 'step_00000002'}"])
    assert sorted(got) == [3, 4]
    torch.testing.assert_close(torch.tensor(_tail(got, 3)), torch.tensor(_tail(ref, 3)), rtol=2e-5, atol=0)


def load_all(info) -> dict:
    flat = {k: (torch.empty(tuple(md.size), dtype=md.properties.dtype) if hasattr(md, "size") else b"")
            for k, md in info.metadata.state_dict_metadata.items()}
    store.load_dcp(flat, info.path, None)
    return flat


@pytest.mark.slow
def test_tensor_parallel_shards_reshard(tmp_path):
    """Saved at tp=2 with expert TP (etp: each expert's hidden dim split too); resumed at world 1
    the loss curve continues: TP shards are stored as whole tensors via DTensor."""
    base = ["train.steps=4"]
    ref = run_dist(H.train, 2, (str(tmp_path / "a"), str(tmp_path / "ck"),
                                base + ["parallel.tp=2", "parallel.etp=true", "checkpoint.every=2"]))[0]
    info = store.verify(str(tmp_path / "ck" / "step_00000002"))
    md = info.metadata.state_dict_metadata
    assert tuple(md["model/embed.weight"].size) == (256, 32)                    # whole, not a vocab shard
    assert tuple(md["model/layers.0.ffn.experts.w1/expert_3"].size) == (32, 32)  # whole expert hidden dim
    assert tuple(md["optim/layers.0.ffn.experts.w2/expert_3/exp_avg"].size) == (32, 32)
    got = H.train(0, 1, str(tmp_path / "b"), str(tmp_path / "ck_b"),
                  base + [f"checkpoint.resume={tmp_path / 'ck' / 'step_00000002'}"])
    assert sorted(got) == [3, 4]
    torch.testing.assert_close(torch.tensor(_tail(got, 3)), torch.tensor(_tail(ref, 3)), rtol=2e-5, atol=0)
