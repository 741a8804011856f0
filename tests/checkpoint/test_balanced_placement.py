"""moe.placement=balanced in training (parallel/replicas.py): with redundant replicas and several
re-placements, dropless, the loss curve and the gradient norm equal world size 1 (the oracle) at
ep = 2 and 4; a run resumed in between continues exactly at the same layout and to the
cross-layout tolerance at any other layout or placement; a checkpoint's placement entry is
untrusted input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import ckpt_helpers as H
from _dist import run_dist

pytestmark = pytest.mark.slow

# 8 steps, re-placements after steps 2, 4, 6 and 8; checkpoints at 5 and 8
BASE = ["train.steps=8", "train.grad_clip=0.5", "moe.rebalance_every=2", "checkpoint.keep_last=10"]
BALANCED_EP2 = BASE + ["parallel.ep=2", "moe.placement=balanced", "moe.redundant_experts=2", "checkpoint.every=5"]
BALANCED_EP4 = BASE + ["parallel.ep=4", "moe.placement=balanced", "moe.redundant_experts=4", "checkpoint.every=0"]
TOL = dict(rtol=2e-5, atol=0)          # tests/parallel/test_cross_layout.py's


def _records(log_dir) -> list[dict]:
    with open(os.path.join(log_dir, "tiny", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(rank, world, log_dir, ckpt_dir, extra):
    H.train(rank, world, log_dir, ckpt_dir, extra)
    return _records(log_dir) if rank == 0 else None


def _curve(recs, key="loss", steps=None):
    return torch.tensor([r[key] for r in recs if steps is None or r["step"] in steps], dtype=torch.float64)


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    root = tmp_path_factory.mktemp("w1")
    torch.set_num_threads(1)
    return _train(0, 1, str(root / "runs"), str(root / "ckpt"), BASE + ["checkpoint.every=0"])


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep2")
    recs = run_dist(_train, 2, (str(root / "runs"), str(root / "ckpt"), BALANCED_EP2))[0]
    return recs, root / "ckpt"


def _replacements(recs) -> list[dict]:
    return [r for r in recs if "placement.move_ms" in r]


def test_balanced_ep2_equals_world1(world1, ep2):
    recs, _ = ep2
    assert len(recs) == len(world1) == 8
    torch.testing.assert_close(_curve(recs), _curve(world1), **TOL)
    torch.testing.assert_close(_curve(recs, "grad_norm"), _curve(world1, "grad_norm"), rtol=1e-4, atol=0)
    events = _replacements(recs)
    assert [r["step"] for r in events] == [2, 4, 6, 8]
    assert sum(r["placement.layers_moved"] for r in events) >= 2, events     # the test moved experts
    for r in events:
        for layer in range(2):
            pre = f"placement.layer{layer}"
            assert sum(r[f"{pre}.replicas"]) == 10 and min(r[f"{pre}.replicas"]) == 1
            assert [len(h) for h in r[f"{pre}.experts_per_rank"]] == [5, 5]
        # a layer that moved predicted a busiest rank at least 3% lower (replicas.MIN_GAIN)
        moved_layers = [i for i in range(2) if r[f"placement.layer{i}.imbalance_after"] != r[f"placement.layer{i}.imbalance_before"]]
        assert len(moved_layers) == r["placement.layers_moved"]


def test_balanced_ep4_equals_world1(world1, tmp_path):
    recs = run_dist(_train, 4, (str(tmp_path / "runs"), str(tmp_path / "ckpt"), BALANCED_EP4))[0]
    torch.testing.assert_close(_curve(recs), _curve(world1), **TOL)
    torch.testing.assert_close(_curve(recs, "grad_norm"), _curve(world1, "grad_norm"), rtol=1e-4, atol=0)
    moved = sum(r["placement.layers_moved"] for r in _replacements(recs))
    assert moved >= 2
    # a replicated expert is held by several ranks (the 4 redundant slots went somewhere)
    last = _replacements(recs)[-1]
    assert max(last["placement.layer0.replicas"]) >= 2 and sum(last["placement.layer0.replicas"]) == 12


MIXED = ["moe.capacity_factor=1.0", "moe.zero_experts.zero=1", "moe.zero_experts.copy=1", "moe.shared_experts=1"]


@pytest.mark.parametrize("world,extra", [
    (4, ["parallel.ep=2", "parallel.dp=4"]),          # edp = 2: expert grads summed over edp, then replicas
    (4, ["parallel.ep=2", "parallel.tp=2"]),          # experts replicated over tp, one placement per tp rank
    (2, ["parallel.ep=2"] + MIXED),                   # capacity drops, MoE++ zero/copy experts, a shared expert
])
def test_balanced_with_edp_and_tp_equals_world1(world1, tmp_path, tmp_path_factory, world, extra):
    args = BASE + extra + ["moe.placement=balanced", "moe.redundant_experts=2", "checkpoint.every=0"]
    recs = run_dist(_train, world, (str(tmp_path / "runs"), str(tmp_path / "ckpt"), args))[0]
    if "moe.capacity_factor=1.0" in extra:          # its own world-1 oracle (drops are per local batch:
        root = tmp_path_factory.mktemp("w1_mixed")  # compare at dp=2 static, which drops the same copies)
        ref = run_dist(_train, 2, (str(root / "runs"), str(root / "ckpt"),
                                   BASE + extra + ["checkpoint.every=0"]))[0]
        torch.testing.assert_close(_curve(recs), _curve(ref), **TOL)
        torch.testing.assert_close(_curve(recs, "grad_norm"), _curve(ref, "grad_norm"), rtol=1e-4, atol=0)
        assert max(r["drop_frac"] for r in recs) > 0
        assert sum(r["placement.layers_moved"] for r in _replacements(recs)) >= 1
        return
    torch.testing.assert_close(_curve(recs), _curve(world1), **TOL)
    torch.testing.assert_close(_curve(recs, "grad_norm"), _curve(world1, "grad_norm"), rtol=1e-4, atol=0)
    assert sum(r["placement.layers_moved"] for r in _replacements(recs)) >= 2


@pytest.mark.parametrize("world,extra,exact", [
    (2, BALANCED_EP2, True),                                                  # same layout: exact
    (1, BASE, False),                                                         # world 1, static
    (4, BALANCED_EP4, False),                                                 # other ep and R
    (2, BASE + ["parallel.ep=2"], False),                                     # static at ep 2
])
def test_resume_from_a_balanced_checkpoint(ep2, tmp_path, world, extra, exact):
    """Step 5 of the balanced ep=2 run (saved between the re-placements after steps 4 and 6, with
    a window of one step), resumed read-only (checkpoint.every=0): steps 6-8 continue the curve."""
    recs, ckpt = ep2
    resume = [f"checkpoint.resume={ckpt / 'step_00000005'}", "checkpoint.every=0"]
    args = (str(tmp_path / "runs"), str(tmp_path / "ckpt2"), [e for e in extra if not e.startswith("checkpoint.every")]
            + resume)
    if world == 1:
        torch.set_num_threads(1)
        got = _train(0, 1, *args)
    else:
        got = run_dist(_train, world, args)[0]
    assert [r["step"] for r in got] == [6, 7, 8]
    want = _curve(recs, steps={6, 7, 8})
    if exact:
        assert _curve(got).tolist() == want.tolist()
        assert [r.get("placement.layer1.experts_per_rank") for r in got] == \
            [r.get("placement.layer1.experts_per_rank") for r in recs if r["step"] >= 6]
    else:
        torch.testing.assert_close(_curve(got), want, **TOL)


def test_static_checkpoint_resumes_balanced(tmp_path):
    """A static run's checkpoint (no placement entry) resumes under moe.placement=balanced, from the
    first placement, and trains on to the same curve."""
    static = BASE + ["parallel.ep=2", "checkpoint.every=5"]
    ref = run_dist(_train, 2, (str(tmp_path / "a"), str(tmp_path / "ck"), static))[0]
    resume = [f"checkpoint.resume={tmp_path / 'ck' / 'step_00000005'}", "checkpoint.every=0"]
    got = run_dist(_train, 2, (str(tmp_path / "b"), str(tmp_path / "ck2"),
                               [e for e in BALANCED_EP2 if e != "checkpoint.every=5"] + resume))[0]
    torch.testing.assert_close(_curve(got), _curve(ref, steps={6, 7, 8}), **TOL)


@pytest.mark.parametrize("mutate,why", [
    (lambda p: p["ranks"][0].__setitem__(0, [0, 0, 1, 2, 3]), "not distinct"),
    (lambda p: p["ranks"][1].__setitem__(1, [4, 5, 6, 7, 99]), "outside"),
    (lambda p: p["ranks"].pop(), "2 MoE layers"),
    (lambda p: p["window"][0].__setitem__(3, -1), "window load"),
    (lambda p: p.__setitem__("version", "x"), "version-1"),
])
def test_hostile_placement_entry_is_one_line_on_every_rank(ep2, tmp_path, mutate, why):
    _, ckpt = ep2
    import shutil
    bad = tmp_path / "step_00000005"
    shutil.copytree(ckpt / "step_00000005", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    mutate(manifest["placement"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    errors = run_dist(H.try_resume, 2, (str(tmp_path / "ck"), str(bad),
                                        [e for e in BALANCED_EP2 if e != "checkpoint.every=5"] + ["checkpoint.every=0"]))
    assert errors[0] == errors[1] and "\n" not in errors[0] and why in errors[0], errors
    assert Path(bad).name in errors[0]


def test_load_report_draws_the_placement(ep2, tmp_path):
    from _tools import load_tool
    report = load_tool("expert_load_report")
    _, ckpt = ep2
    res = report.build_report(str(ckpt.parent / "runs" / "tiny"), str(tmp_path / "rep"))
    assert Path(res["placement"]).stat().st_size > 10_000
    assert "placement: 4 re-placements" in res["summary"]


def test_tensorboard_gets_the_placement(ep2, tmp_path):
    """The re-placement keys of a step's record reach TensorBoard: imbalance before/after and the
    replicas as scalars, the experts per rank as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moetrain.metrics import RunWriter
    recs, _ = ep2
    event = next(r for r in recs if r.get("placement.layers_moved"))
    writer = RunWriter(str(tmp_path), tensorboard=True)
    writer.write(event)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "placement/layer0/imbalance_before" in tags["scalars"] and "placement/move_ms" in tags["scalars"]
    assert "placement/layer1/experts_per_rank/text_summary" in tags["tensors"], tags["tensors"]
    # add_scalars writes one run per replica count (placement/layer0/replicas_<expert>)
    runs = [d.name for d in (tmp_path / "tb").iterdir() if d.is_dir()]
    assert any(name.startswith("placement_layer0_replicas") for name in runs), runs
