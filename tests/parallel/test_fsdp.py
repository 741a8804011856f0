"""FSDP2 (parallel.fsdp=true, parallel/fsdp.py) composed with expert and tensor parallelism.

The oracle is world size 1 (capacity_factor null): every FSDP layout must reproduce its loss and
grad-norm curves (rtol 2e-5) and, after FSDP's reduce-scatter, hold exactly its slice of the
world-1 gradients: summed over dp, not averaged (FSDP2's default would divide by dp).
Checkpoints: an FSDP run resumed at the same layout continues bitwise; FSDP checkpoints load at
other layouts (no FSDP, another tp/ep, world 1) and FSDP runs load checkpoints written without
FSDP (world 1), each continuing the world-1 curve.

Each world size runs all its cases in ONE run_dist call (one process group, one mesh per case).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from _dist import run_dist
from _train import TINY_3D
from moetrain.config import ConfigError, load_config, validate_layout
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

TINY = TINY_3D
CONFIG = "configs/tiny_cpu.yaml"
FSDP = ["parallel.fsdp=true"]
SAVE3 = ["checkpoint.every=3"]         # saves step 3 (and the final step 5)


def _env(rank, world):
    from moetrain.parallel.mesh import LaunchEnv
    return LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _step3(root, name):
    return os.path.join(root, name, "step_00000003")


def _body(rank, world, root, cases):
    """For each case (name, overrides, resume-from case or None): the synced step-0 gradients as
    global tensors (DTensor shards gathered over their FSDP and TP meshes), then a 5-step run's
    metrics (rank 0), and how each parameter is held."""
    from torch.distributed.tensor import DTensor

    from moetrain.data import load_token_data
    from moetrain.parallel.mesh import init_parallel
    from moetrain.train import loop

    out = {}
    data = None
    for name, extra, resume in cases:
        more = [f"logging.dir={root}/runs", f"logging.run_name={name}", f"checkpoint.dir={root}/ck/{name}"]
        if resume is not None:
            more.append(f"checkpoint.resume={_step3(root + '/ck', resume)}")
        cfg = load_config(CONFIG, TINY + extra + more)
        dp, tp, ep = validate_layout(cfg, world)
        par = init_parallel(dp, tp, ep, _env(rank, world), "cpu")
        data = data or load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
        grads, held = {}, {}
        if resume is None:
            trainer = loop.build_trainer(cfg, par, data)
            trainer.compute_gradients(step=0)
            modules = dict(trainer.model.named_modules())
            for pname, p in trainer.model.named_parameters():
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                owner = modules[pname.rsplit(".", 1)[0]]
                offset = getattr(owner, "expert_offset", None)                # GroupedExperts
                if pname.rsplit(".", 1)[1].startswith("expert_"):              # PEER tables
                    offset = owner.row_offset
                grads[pname] = (offset, g.clone())
                held[pname] = _held(p) if isinstance(p, DTensor) else None
        loop.run_training(cfg, par, data, log=lambda m: None)
        out[name] = {"grads": grads, "held": held, "edp": par.dims.edp,
                     "records": _records(os.path.join(root, "runs", name)) if rank == 0 else None}
    return out


def _held(p):
    """(FSDP mesh axis, its shard dim, local numel x TP shards, global numel) of a DTensor."""
    names = p.device_mesh.mesh_dim_names
    tp = p.device_mesh.size(names.index("tp")) if "tp" in names else 1
    return names[0], p.placements[0].dim, p.to_local().numel() * tp, p.numel()


PEER = ["moe.layer=peer", "moe.peer.num_keys=8", "moe.peer.top_k=4", "moe.peer.key_dim=16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """World 1, no FSDP: curves, step-0 gradients, and a checkpoint at step 3 (case "w1")."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = str(tmp_path_factory.mktemp("fsdp_w1"))
    res = _body(0, 1, root, [("w1", SAVE3, None), ("peer", PEER, None)])
    res["root"] = root
    return res


def _local(full, offset, like):
    return full if offset is None else full[offset:offset + like.shape[0]]


def _check_curve(ref, got, name, keys=("loss", "grad_norm", "aux_loss"), first=1):
    want = [r for r in ref["w1"]["records"] if r["step"] >= first]
    got = [r for r in got if r["step"] >= first]
    assert [r["step"] for r in got] == [r["step"] for r in want], name
    for key in keys:
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=2e-5, atol=0, msg=f"{name} {key}")


def _check_case(ref, per_rank, name, ref_name="w1"):
    ref = {"w1": ref[ref_name]}
    _check_curve(ref, per_rank[0][name]["records"], name)
    for res in per_rank:
        r = res[name]
        for pname, (offset, g) in r["grads"].items():
            want = _local(ref["w1"]["grads"][pname][1], offset, g)
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7, msg=lambda m, p=pname: f"{name} {p}: {m}")
        # FSDP really shards: dense params over dp, routed experts over edp (each rank a slice);
        # PEER expert tables stay whole, synced by the loop's all-reduce
        for pname, held in r["held"].items():
            if ".expert_" in pname:
                assert held is None, (name, pname, held)
                continue
            assert held is not None, f"{name}: {pname} is not FSDP-managed"
            axis, dim, local, whole = held
            assert axis == ("edp" if ".experts." in pname else "dp"), (name, pname, axis)
            if ".experts." in pname:
                assert dim != 0 and local * r["edp"] == whole, (name, pname, held)


W2 = [("dp2_ep1", FSDP + ["parallel.ep=1"], None),
      ("dp2_ep2", FSDP + ["parallel.ep=2"] + SAVE3, None),
      # same layout: continues bitwise
      ("dp2_ep2_resumed", FSDP + ["parallel.ep=2"], "dp2_ep2"),
      # an FSDP checkpoint without FSDP (other ep), and a world-1 checkpoint under FSDP
      ("dp2_ep1_nofsdp_from_fsdp", ["parallel.ep=1"], "dp2_ep2"),
      ("dp2_ep2_from_w1", FSDP + ["parallel.ep=2"], "../w1"),
      ("dp2_ep2_peer", FSDP + ["parallel.ep=2"] + PEER, None)]


def test_world2_fsdp_matches_world1(reference, tmp_path):
    torch.set_num_threads(1)
    os.symlink(os.path.join(reference["root"], "ck", "w1"), tmp_path / "w1")   # "../w1" from ck/
    per_rank = run_dist(_body, 2, (str(tmp_path), W2), timeout_s=300)
    for name in ("dp2_ep1", "dp2_ep2"):
        _check_case(reference, per_rank, name)
    _check_case(reference, per_rank, "dp2_ep2_peer", "peer")
    base = per_rank[0]["dp2_ep2"]["records"]
    resumed = per_rank[0]["dp2_ep2_resumed"]["records"]
    assert [r["step"] for r in resumed] == [4, 5]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in base[3:]]       # bitwise
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in base[3:]]
    for name in ("dp2_ep1_nofsdp_from_fsdp", "dp2_ep2_from_w1"):
        _check_curve(reference, per_rank[0][name]["records"], name, first=4)
    # and the FSDP checkpoint at world 1
    torch.manual_seed(0)
    os.symlink(tmp_path / "ck" / "dp2_ep2", tmp_path / "ck" / "w1_from_fsdp_src")
    w1 = _body(0, 1, str(tmp_path), [("w1_from_fsdp", [], "w1_from_fsdp_src")])["w1_from_fsdp"]
    _check_curve(reference, w1["records"], "world 1 from an FSDP checkpoint", first=4)


W4 = [("dp4_ep2", FSDP + ["parallel.ep=2"], None),
      ("tp2_dp2_ep2_etp", FSDP + ["parallel.tp=2", "parallel.ep=2", "parallel.etp=true"] + SAVE3, None),
      # FSDP x TP x etp checkpoint -> FSDP at dp=4 ep=4 without TP
      ("dp4_ep4_from_tp", FSDP + ["parallel.ep=4"], "tp2_dp2_ep2_etp")]


def test_world4_fsdp_matches_world1(reference, tmp_path):
    torch.set_num_threads(1)
    per_rank = run_dist(_body, 4, (str(tmp_path), W4), timeout_s=300)
    for name in ("dp4_ep2", "tp2_dp2_ep2_etp"):
        _check_case(reference, per_rank, name)
    _check_curve(reference, per_rank[0]["dp4_ep4_from_tp"]["records"], "dp4_ep4_from_tp", first=4)


def test_fsdp_shard_dims():
    from moetrain.parallel.fsdp import fsdp_shard_dim
    assert fsdp_shard_dim((8, 4), False, None, 2) == 0
    assert fsdp_shard_dim((8, 4), False, 0, 2) == 1            # never the TP dim
    assert fsdp_shard_dim((4, 32, 16), True, None, 2) == 1     # never an expert's dim 0
    assert fsdp_shard_dim((4, 32, 16), True, 1, 2) == 2
    assert fsdp_shard_dim((4, 30, 16), True, 2, 4) is None     # off dim 0 FSDP needs even shards
    assert fsdp_shard_dim((6, 8), False, None, 4) == 1         # even shards only
    assert fsdp_shard_dim((6, 3), False, None, 4) is None      # left to the loop's all-reduce


def test_config_fsdp_combinations():
    cfg = load_config(CONFIG, TINY + FSDP + ["parallel.ep=2", "parallel.tp=2"])
    assert cfg.parallel.fsdp and validate_layout(cfg, 8) == (4, 2, 2)
    with pytest.raises(ConfigError, match=r"^parallel.fsdp=True is not allowed: .*train.engine=deepspeed"):
        load_config(CONFIG, TINY + FSDP + ["train.engine=deepspeed"])


def test_bench_memory_measures_fsdp_savings():
    """tools/bench_memory.py --quick at world 2: FSDP holds about half of plain data parallelism's
    parameter, gradient and optimizer bytes per rank (dp=2, ep=1), measured from live tensors."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "tools/bench_memory.py", "--quick", "--worlds", "2", "--modes", "native,fsdp"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by = {(r["mode"], r["dp"], r["tp"], r["ep"]): r for r in rows}
    assert set(by) == {("native", 2, 1, 1), ("fsdp", 2, 1, 1), ("native", 2, 1, 2), ("fsdp", 2, 1, 2),
                       ("native", 1, 2, 1)}
    plain, fsdp = by[("native", 2, 1, 1)], by[("fsdp", 2, 1, 1)]
    for key in ("params", "grads", "optim"):
        for a, b in zip(plain["ranks"], fsdp["ranks"]):
            assert 0.45 * a[key] <= b[key] <= 0.55 * a[key], (key, a, b)
    assert "| 2 | 1 | 1 | fsdp |" in proc.stdout
