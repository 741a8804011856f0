"""Layouts proved at 64, 256 and 1,024 ranks in one CPU process (issue 18), with torch's fake
process group (torch.testing._internal.distributed.fake_pg): tools/check_layouts.py does the work,
this module runs it over layouts and configs and shows that its checks fail on broken layouts.

How one rank is built (check_layouts.build_rank): `dist.init_process_group("fake", rank=r,
world_size=W, store=FakeStore())`, then moetrain's own init_parallel(dp, tp, ep, LaunchEnv(r, W,
...), "cpu"): it accepts the already initialized default group (it skips its rendezvous and
init_process_group, and only needs MASTER_ADDR/MASTER_PORT in the environment, which the tool sets
for the duration), so mesh.py needed no change. Then, in build_trainer's order: Transformer on the
meta device, apply_ep, apply_routing_groups, apply_tp (with etp), apply_fsdp, split_params and
GradientSync (init_weights is skipped: values, not layout). The group is destroyed and made anew
for the next sampled rank; between ranks DTensor's sharding-propagation caches must be cleared
(check_layouts.clear_dtensor_caches): they key on DeviceMesh equality, which ignores the process
groups, and would hand FSDP the previous rank's (destroyed) mesh. A real run is one rank per
process and never meets that.

What is checked, per sampled rank (0, 1, W/2, W-1, random ones and, with all_slots, one rank in
every EP slot), against mesh.py's arithmetic rank = (edp_idx*ep + ep_idx)*tp + tp_idx:
  - the tp / ep / edp / dp / world groups (dist.get_process_group_ranks), the rank's index in each,
    the root mesh (edp, ep, tp) and its coordinate, and the DeviceMesh of every DTensor parameter;
  - every MoE layer holds experts [ep_idx*L, (ep_idx+1)*L), L = E/ep, and its dispatcher exchanges
    over its own EP group (PEER: table rows likewise);
  - each parameter is TP-sharded exactly when model/tp_plan.py says so and FSDP-sharded (over dp,
    experts over edp) exactly when apply_fsdp did not leave it out; no expert dim 0 is sharded;
  - gradients: the clipping norm's sum groups x local size = the logical size; GradientSync sums
    a plain parameter over dp (experts: edp) and leaves FSDP's to FSDP;
  - checkpoint (checkpoint/state.model_entries, keys by global expert id): the keys and global
    shapes are the world-1 model's, a rank's expert ids are its EP slot's, and the block each key
    tells DCP this rank holds (its DTensor on the (edp, ep, tp) root mesh) is the block of the
    parameter the rank really holds (torch's arithmetic on the parameter's own mesh; an expert
    key drops the expert dim): DCP would otherwise write the right data at the wrong offsets.
Across ALL W ranks (analytically: the sampled ranks must agree on every parameter's DTensor spec,
and each rank's block follows from its mesh coordinate by torch's own shard arithmetic, experts
placed by EP slot):
  - ownership: every parameter element is held by exactly R ranks, the blocks tiling the logical
    tensor (all E experts), where R is "once per replica group":
        R = (dp, or edp for an expert, unless FSDP shards it) x (tp unless TP shards it)
    i.e. without FSDP: dense whole W, dense TP-sharded dp, experts edp*tp (etp: edp);
    with FSDP: dense whole tp, dense TP-sharded 1, experts tp (etp: 1); FSDP's left-out
    parameters (no evenly divisible dim) count as without FSDP;
  - the ranks holding a sampled rank's block are exactly its gradient-sum group x the tp group
    when the parameter is whole on every TP rank;
  - checkpoint: over the EP slots the expert ids cover 0..E-1 once (observed with all_slots,
    else extrapolated), and in DCP's view (each key a DTensor on the (edp, ep, tp) mesh) the
    holders' blocks of every key tile it with the same R: what DCP's dedup needs.

What the fake group cannot run, and why: it completes every collective at once without moving
data. all_reduce leaves the tensor as it was; all_gather copies this rank's input into every
output slot, and all_to_all_single copies the input to the output (test_fake_group_moves_no_data).
So anything whose result depends on another rank's data is out of reach: the all-to-all split
sizes (moe/dispatch exchange_counts would report that every peer sends exactly what this rank
sends), the token exchange, PEER's all_gather of ids, FSDP's unshard / reduce-scatter results,
gradient all-reduces, the clipping norm and loss reductions, the start-up agreement over the
rendezvous store (skipped: the group already exists) and a DCP save or load (its planner
all-gathers every rank's plan and dedups replicated blocks from what it receives, and the meta
device holds no data to write). The ownership and checkpoint checks compute offline what DCP's
planner would see; tests/parallel/test_cross_layout.py and test_fsdp.py check the numbers at worlds
2 and 4 with gloo.

Numbers (this 2-core machine, shared with other jobs, so wall times vary by 2x; 2026-11-28):
  unmarked (~35-60 s in all): 11 layouts of a 64-expert tiny config, every EP slot sampled:
    W=64: 4 layouts, 46 ranks, 3-8 s; W=256: 3 layouts, 118 ranks, 5-17 s;
    W=1024: 4 layouts, 184 ranks, 12-14 s; plus Mixtral 8x7B at W=1024 (tp8.ep8.fsdp, 11 ranks,
    5 s), the checker's own failure modes (7 broken layouts) and the CLI.
  slow sweep (~6-7 min): every valid (tp 1/2/4/8, ep 1/8/64, FSDP, etp) layout of the tiny config
    (30 / 38 / 42 layouts at W = 64 / 256 / 1024: 374 / 910 / 1176 ranks, 31-97 s each), Mixtral
    8x7B (7 layouts per world, 65-69 ranks, 16-37 s) and DeepSeekMoE 16B (5-6 layouts, 53-62 ranks,
    19-38 s). The Mixtral model builds on the meta device in 0.02-0.6 s (46.70B parameters).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from _tools import TOOLS

if str(TOOLS) not in __import__("sys").path:
    __import__("sys").path.insert(0, str(TOOLS))
import check_layouts as CL  # noqa: E402  (tools/ is not a package; its dataclasses need sys.modules)

TINY = "configs/tiny_cpu.yaml"
MIXTRAL = "configs/mixtral_8x7b.yaml"
DEEPSEEK = "configs/deepseek_moe_16b.yaml"
# the tiny config grown so that ep can reach 64 and tp 8: 64 experts, 16 query / 8 K-V heads, a
# dense first layer and a shared expert (TP-sharded SwiGLUs next to the experts)
BIG = ("train.device=cpu", "moe.num_experts=64", "model.vocab_size=1024", "model.n_heads=16",
       "model.n_kv_heads=8", "moe.first_dense_layers=1", "moe.shared_experts=1")
PIN = ("train.device=cpu",)
L = CL.Layout


def _need(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in this checkout")


def _run(config: str, world: int, layouts, extra=PIN, all_slots: bool = True, n_random: int = 3):
    """Check each layout; print one line per layout; return the results (invalid layouts skipped)."""
    from moetrain.config import ConfigError
    results = []
    for layout in layouts:
        try:
            res = CL.check_layout(config, world, layout, tuple(extra), n_random=n_random, all_slots=all_slots)
        except ConfigError as exc:
            print(f"{config} W={world} {layout.label}: invalid ({exc})")
            continue
        print(f"{os.path.basename(config)} W={world} {layout.label}: {len(res.ranks)} ranks, {res.params} params, "
              f"{res.ckpt_keys} ckpt keys, {res.checks} checks, {res.seconds:.1f} s ({res.cpu_seconds:.1f} s CPU)"
              + (f", {len(res.failures)} FAILED" if res.failures else ""))
        results.append(res)
    return results


def _assert_ok(results) -> None:
    assert results, "no valid layout was checked"
    bad = {f"W={r.world} {r.layout.label}": r.failures[:5] for r in results if r.failures}
    assert not bad, bad


# ----------------------------------------------------------------------------- the fake group


def test_fake_group_moves_no_data():
    """Why data-dependent collectives cannot be checked here (see the module docstring)."""
    from moetrain.parallel.comm import exchange_counts
    with CL.fake_world(3, 8):
        x = torch.tensor([1.0, 2.0])
        dist.all_reduce(x)
        assert x.tolist() == [1.0, 2.0]                      # a real SUM over 8 ranks would be 8x
        out = [torch.full((2,), -1.0) for _ in range(8)]
        dist.all_gather(out, torch.tensor([5.0, 6.0]))
        assert all(o.tolist() == [5.0, 6.0] for o in out)    # every "peer" looks like this rank
        counts = torch.arange(16).view(8, 2)
        # the EP count exchange: "received" counts are this rank's own send counts
        assert torch.equal(exchange_counts(counts, dist.group.WORLD), counts)


# ----------------------------------------------------------------------------- the checker itself


def test_partition_check_sees_gaps_overlaps_and_wrong_counts():
    ok = Counter({((0, 2), (0, 4)): 3, ((2, 2), (0, 4)): 3})
    assert CL._partition(ok, (4, 4), 3) is None
    assert "held by 3 ranks, expected 2" in CL._partition(ok, (4, 4), 2)
    gap = Counter({((0, 2), (0, 4)): 1, ((3, 1), (0, 4)): 1})
    assert "do not tile" in CL._partition(gap, (4, 4), 1)
    overlap = Counter({((0, 3), (0, 4)): 1, ((2, 2), (0, 4)): 1})
    assert "do not tile" in CL._partition(overlap, (4, 4), 1)
    short = Counter({((0, 2), (0, 4)): 1})
    assert "end at 2" in CL._partition(short, (4, 4), 1)
    not_grid = Counter({((0, 2), (0, 2)): 1, ((2, 2), (2, 2)): 1})       # two corners of a 4x4
    assert "grid" in CL._partition(not_grid, (4, 4), 1)


def test_arithmetic_matches_the_documented_rank_order():
    a = CL.Arith(world=16, dp=8, tp=2, ep=4)          # edp 2
    assert a.coord(13) == {"tp": 1, "dp": 6, "ep": 2, "edp": 1}
    assert a.group(13, "tp") == [12, 13]
    assert a.group(13, "ep") == [9, 11, 13, 15]
    assert a.group(13, "edp") == [5, 13]
    assert a.group(13, "dp") == [1, 3, 5, 7, 9, 11, 13, 15]
    assert a.submesh(13, ("dp", "tp")).tolist() == torch.arange(16).reshape(8, 2).tolist()


def _patch_ep_offset(mp):
    import moetrain.parallel.apply as A
    orig = A.apply_ep
    # experts of the next EP slot: every rank shifted by one slot
    mp.setattr(A, "apply_ep", lambda model, par: orig(model, dataclasses.replace(
        par, rank=(par.rank + par.dims.tp) % par.world)))


def _patch_swap_groups(mp):
    import moetrain.parallel.mesh as M
    orig = M.init_parallel
    mp.setattr(M, "init_parallel", lambda *a, **k: (lambda p: dataclasses.replace(
        p, ep_group=p.edp_group, edp_group=p.ep_group))(orig(*a, **k)))


def _patch_fsdp_expert_dim0(mp):
    import moetrain.parallel.fsdp as F
    orig = F.fsdp_shard_dim
    mp.setattr(F, "fsdp_shard_dim", lambda shape, is_expert, tp_dim, size: orig(shape, False, tp_dim, size))


def _patch_sync_experts_over_dp(mp):
    import moetrain.parallel.grads as G
    orig = G.GradientSync.__init__

    def init(self, dense, expert, par, mb):
        orig(self, dense, expert, dataclasses.replace(par, edp_group=par.dp_group), mb)
    mp.setattr(G.GradientSync, "__init__", init)


def _patch_tp_on_ep_axis(mp):
    import moetrain.parallel.mesh as M
    mp.setattr(M.Parallel, "tp_mesh", property(lambda self: self.mesh["ep"] if self.dims.tp > 1 else None))


def _patch_ckpt_dp_as_edp(mp):
    import moetrain.checkpoint.state as S
    # the checkpoint forgets that an FSDP split over "dp" is one over edp AND ep
    mp.setattr(S, "_AXES", {"tp": ("tp",), "dp": ("edp",), "edp": ("edp",)})


def _patch_ckpt_expert_dim(mp):
    import moetrain.checkpoint.state as S
    orig = S._Placement.__init__

    def init(self, name, t, modules, sizes):      # an expert key's split dims off by one
        orig(self, name, t, modules, sizes)
        if self.owner is not None and self.splits:
            self.splits = {a: d + 1 for a, d in self.splits.items()}
    mp.setattr(S._Placement, "__init__", init)


@pytest.mark.parametrize("patch, layout, expect", [
    (_patch_ep_offset, L(2, 8), "its EP slot"),
    (_patch_swap_groups, L(2, 4), "ep group"),
    (_patch_fsdp_expert_dim0, L(1, 8, fsdp=True), "sharded on its expert dim 0"),
    (_patch_sync_experts_over_dp, L(1, 8), "GradientSync sums it over"),
    (_patch_tp_on_ep_axis, L(2, 2), "TP-sharded False"),
    (_patch_ckpt_dp_as_edp, L(2, 4, fsdp=True), "describes block"),
    (_patch_ckpt_expert_dim, L(2, 4, fsdp=True), "describes block"),
], ids=["expert-offset", "ep-edp-swapped", "fsdp-expert-dim0", "expert-grads-over-dp", "tp-on-ep-axis",
        "ckpt-dp-as-edp", "ckpt-expert-split-dim"])
def test_broken_layouts_are_caught(monkeypatch, patch, layout, expect):
    """Each check fails on the bug it is there for (the layout code patched in this process)."""
    patch(monkeypatch)
    res = CL.check_layout(TINY, 64, layout, BIG, n_random=1)
    assert res.failures and any(expect in f for f in res.failures), res.failures[:5]


# ----------------------------------------------------------------------------- layouts at scale

FAST = {
    64: [L(1, 1), L(2, 8, fsdp=True), L(4, 16, etp=True), L(8, 8, fsdp=True, etp=True)],
    256: [L(1, 64, fsdp=True), L(4, 16, fsdp=True, etp=True), L(8, 32)],
    1024: [L(8, 64, fsdp=True, etp=True), L(1, 64), L(2, 32, fsdp=True), L(4, 16, etp=True)],
}


@pytest.mark.parametrize("world", sorted(FAST))
def test_layouts_at_scale(world):
    """A 64-expert config, every EP slot sampled (the expert-id coverage is observed)."""
    t0 = time.perf_counter()
    results = _run(TINY, world, FAST[world], BIG)
    print(f"W={world}: {len(results)} layouts, {sum(len(r.ranks) for r in results)} ranks, "
          f"{time.perf_counter() - t0:.1f} s")
    _assert_ok(results)
    assert len(results) == len(FAST[world])


def test_mixtral_at_1024_ranks():
    _need(MIXTRAL)
    results = _run(MIXTRAL, 1024, [L(8, 8, fsdp=True)], all_slots=True)
    _assert_ok(results)


def test_meta_mixtral_builds_in_seconds():
    _need(MIXTRAL)
    from moetrain.model.transformer import Transformer, count_params
    cfg = CL.layout_config(MIXTRAL, 1, L(), PIN)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    took = time.perf_counter() - t0
    total, active = count_params(model, cfg)
    print(f"Mixtral 8x7B on the meta device: {took:.2f} s, {total / 1e9:.2f}B total, {active / 1e9:.2f}B active")
    assert took < 30 and abs(total / 46.7e9 - 1) < 0.01


def test_cli_prints_a_table(capsys):
    rc = CL.main(["--config", TINY, "--world", "64", "--layout", "tp=2,ep=8,fsdp", "--layout", "tp=3",
                  "--random", "1", *[a for o in BIG for a in ("--override", o)]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tp2.ep8.fsdp" in out and " ok" in out
    assert "invalid: parallel.tp=3" in out


# ----------------------------------------------------------------------------- the full sweep


def _sweep_tiny():
    out = []
    for tp in (1, 2, 4, 8):
        for ep in (1, 8, 64):
            for fsdp in (False, True):
                for etp in ((False, True) if tp > 1 else (False,)):
                    out.append(L(tp, ep, fsdp, etp))
    return out


SWEEP = {
    TINY: (BIG, _sweep_tiny()),
    MIXTRAL: (PIN, [L(1, 8), L(1, 8, fsdp=True), L(8, 1), L(8, 8, fsdp=True), L(4, 8, etp=True),
                    L(8, 8, fsdp=True, etp=True), L(2, 4, fsdp=True)]),
    DEEPSEEK: (PIN, [L(1, 64, fsdp=True), L(8, 64, etp=True), L(2, 16, fsdp=True), L(4, 8, fsdp=True, etp=True),
                     L(8, 1), L(1, 8)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [64, 256, 1024])
@pytest.mark.parametrize("config", list(SWEEP), ids=lambda c: os.path.basename(c).removesuffix(".yaml"))
def test_layout_sweep(config, world):
    """Every listed layout valid at this world size (the others are reported and skipped); every EP
    slot sampled where ep <= 16 or the model is the tiny one (building 64 ranks of a real model
    with FSDP takes minutes here), else 7 ranks with the expert ids extrapolated."""
    _need(config)
    extra, layouts = SWEEP[config]
    t0 = time.perf_counter()
    results = []
    for layout in layouts:
        results += _run(config, world, [layout], extra, all_slots=config == TINY or layout.ep <= 16)
    print(f"{os.path.basename(config)} W={world}: {len(results)} layouts, "
          f"{sum(len(r.ranks) for r in results)} ranks, {time.perf_counter() - t0:.1f} s")
    _assert_ok(results)
