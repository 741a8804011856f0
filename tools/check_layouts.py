"""Prove a parallel layout at any world size on one CPU, before the cluster exists.

For each layout (tp, ep, FSDP, etp) and each sampled rank, one process builds that rank exactly
as training does, with torch's fake process group standing in for the other ranks:
moetrain.parallel.mesh.init_parallel (the real DeviceMesh and groups, on a default group that
is already initialized: init_parallel then skips its rendezvous), the model on the meta device
(no memory, no data), apply_ep, apply_routing_groups, apply_tp, apply_fsdp, GradientSync, and
the checkpoint's model entries (checkpoint/state.model_entries). Then it checks:

  groups     the tp / ep / edp / dp groups, the root mesh and its coordinate, and the DeviceMesh
             of every DTensor parameter hold the ranks that mesh.py's arithmetic names:
             rank = (edp_idx * ep + ep_idx) * tp + tp_idx
  experts    every GroupedExperts holds experts [ep_idx*L, (ep_idx+1)*L), L = E/ep, and its
             dispatcher exchanges over this rank's EP group (PEER tables: rows likewise)
  ownership  every parameter element is held by the expected number of ranks: the blocks of ALL
             ranks (from the sampled ranks' DTensor specs and each rank's mesh coordinate,
             torch's own shard arithmetic; experts placed by EP slot) partition the logical
             tensor (all E experts) and each block is held by exactly R ranks, with R from the
             design, not from the placements:
                 R = (dp, or edp for experts, unless FSDP shards it) x (tp unless TP shards it)
             (no FSDP: dense W or dp, experts edp*tp or edp with etp; FSDP: dense tp or 1,
             experts tp or 1 with etp; a parameter FSDP leaves out counts as without FSDP)
  gradients  the ranks holding this rank's block of a parameter are exactly its gradient-sum
             group (GradientSync's dp / edp group, or none when FSDP reduce-scatters it) times the
             tp group when the parameter is whole on every TP rank; and the clipping norm's sum
             groups (parallel/grads._shard_groups, plus ep for experts) times the local size give
             the logical size (each element counted once)
  checkpoint the keys of every sampled rank are the world-1 model's keys (global expert ids, same
             global shapes); expert ids on a rank are its EP slot's; the block each key's DTensor
             on the (edp, ep, tp) mesh claims for this rank is the block of the parameter it
             really holds (else DCP writes right data at wrong offsets); over the EP slots the ids
             cover 0..E-1 once; and in DCP's view (each key's DTensor on the (edp, ep, tp) mesh)
             the holders' blocks partition every key with the same R as the parameter

Sampled ranks: 0, 1, W/2, W-1, `--random` seeded random ranks, and with --all-ep-slots one rank in
every EP slot (then the expert-id coverage is observed, not extrapolated). Ranks not sampled are
covered by extrapolation: every rank runs the same code, so its layout is the sampled one's at its
own mesh coordinate (the checks above assert that the sampled ranks agree on every spec).

What the fake group cannot show: anything whose result depends on data another rank sends. The
fake group completes every collective without moving data (outputs are left as allocated), so
the all-to-all split sizes (exchange_counts), the token exchange itself, all_gather / reduce-
scatter results (FSDP's unshard, PEER's RowShardDispatcher), gradient all-reduces, loss / norm
reductions, the start-up agreement (rendezvous store; skipped since the group already exists)
and a DCP save or load (its planner all-gathers every rank's save plan and dedups the
replicated blocks by what it receives) cannot be checked here; the ownership and checkpoint
checks above compute offline what DCP's planner would see. tests/parallel/test_cross_layout.py
and test_fsdp.py check those numerically at worlds 2 and 4 with gloo.

usage: python tools/check_layouts.py --config configs/mixtral_8x7b.yaml --world 1024 \\
           --layout tp=8,ep=8,fsdp --layout tp=4,ep=8,etp [--random 4] [--all-ep-slots] [--set k=v ...]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from moetrain.errors import first_line  # noqa: E402

BASE_AXES = ("edp", "ep", "tp")
TP_LINEAR = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    fsdp: bool = False
    etp: bool = False

    @property
    def label(self) -> str:
        return f"tp{self.tp}.ep{self.ep}" + (".etp" if self.etp else "") + (".fsdp" if self.fsdp else "")

    def overrides(self, world: int) -> list[str]:
        """Config overrides for this layout at `world` ranks (a batch that every dp divides)."""
        return [f"parallel.tp={self.tp}", f"parallel.ep={self.ep}", f"parallel.fsdp={str(self.fsdp).lower()}",
                f"parallel.etp={str(self.etp).lower()}", f"train.global_batch_size={world}",
                "train.micro_batch_size=1"]


def parse_layout(text: str) -> Layout:
    """'tp=8,ep=8,fsdp,etp' -> Layout."""
    kw: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key in ("tp", "ep"):
            kw[key] = int(value)
        elif key in ("fsdp", "etp"):
            kw[key] = value in ("", "1", "true", "yes")
        else:
            raise ValueError(f"layout {text!r}: unknown part {part!r} (tp=N, ep=N, fsdp, etp)")
    return Layout(**kw)


def layout_config(path: str, world: int, layout: Layout, extra: tuple = ()):
    """The config at `path` with the layout's overrides, pinned to the CPU, validated."""
    from moetrain.config import load_config
    return load_config(path, ["train.device=cpu", *layout.overrides(world), *extra])


class Arith:
    """moetrain's rank layout as plain arithmetic (parallel/mesh.py's module docstring)."""

    def __init__(self, world: int, dp: int, tp: int, ep: int):
        self.world, self.dp, self.tp, self.ep = world, dp, tp, ep
        self.edp = dp // ep
        self.sizes = {"edp": self.edp, "ep": ep, "tp": tp, "dp": dp}
        self.grid = torch.arange(world).reshape(self.edp, ep, tp)

    def coord(self, r: int) -> dict[str, int]:
        tp_i, dp_i = r % self.tp, r // self.tp
        return {"tp": tp_i, "dp": dp_i, "ep": dp_i % self.ep, "edp": dp_i // self.ep}

    def submesh(self, r: int, names: tuple) -> torch.Tensor:
        """The rank tensor of the mesh with dim `names` (edp / ep / tp / dp = edp x ep) through r."""
        c = self.coord(r)
        base = [a for n in names for a in (("edp", "ep") if n == "dp" else (n,))]
        idx = tuple(slice(None) if a in base else c[a] for a in BASE_AXES)
        kept = [a for a in BASE_AXES if a in base]
        t = self.grid[idx].permute(*[kept.index(a) for a in base])
        return t.reshape([self.sizes[n] for n in names])

    def group(self, r: int, axis: str) -> list[int]:
        return self.submesh(r, (axis,)).tolist()

    def mesh_coord(self, r: int, names: tuple) -> list[int]:
        c = self.coord(r)
        return [c[n] for n in names]


# ----------------------------------------------------------------------------- one rank


@contextlib.contextmanager
def fake_world(rank: int, world: int):
    """The default process group of `rank` in a world of `world`, under torch's fake backend
    (collectives complete at once and move no data); init_parallel uses a group that exists."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process: the fake world "
                           "needs its own (run the layout checks in a process of their own)")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
        clear_dtensor_caches()


def clear_dtensor_caches() -> None:
    """Forget DTensor's sharding-propagation and redistribution caches. They are keyed by
    DeviceMesh equality, which compares rank layouts, not process groups: after the next rank's
    group is made, a cache hit would hand FSDP an output spec on the previous rank's mesh, whose
    groups were destroyed ("Could not resolve the process group ..."). Only a process that plays
    several ranks one after another needs this; a training process is one rank for its life."""
    from torch.distributed.tensor._redistribute import _gen_transform_infos
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    _clear_sharding_prop_cache()
    _gen_transform_infos.cache_clear()


@dataclass
class Built:
    par: object
    model: nn.Module
    left_out: list
    sync: object
    dense: list
    expert: list


def build_rank(cfg, world: int, rank: int, gpus_per_node: int = 8) -> Built:
    """Rank `rank` as build_trainer makes it, on the meta device (call inside fake_world):
    init_parallel, Transformer, apply_ep, apply_routing_groups, apply_tp, apply_fsdp, the
    dense/expert split and GradientSync. init_weights is skipped (data, not layout)."""
    from moetrain.config import ConfigError, validate_layout
    from moetrain.model.tp_plan import apply_tp
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.apply import apply_ep, apply_routing_groups, split_params
    from moetrain.parallel.fsdp import apply_fsdp
    from moetrain.parallel.grads import GradientSync
    from moetrain.parallel.mesh import LaunchEnv, init_parallel

    dp, tp, ep = validate_layout(cfg, world)
    if cfg.moe.placement == "balanced" and ep > 1:
        # its ownership and checkpoint-key checks know contiguous expert slices only
        raise ConfigError("moe.placement=balanced is not checked by check_layouts yet (it checks the static "
                          "placement's expert slices): use moe.placement=static here")
    local_world = min(gpus_per_node, world)
    env = LaunchEnv(rank, world, rank % local_world, local_world, "torchrun")
    par = init_parallel(dp, tp, ep, env, "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_ep(model, par)
    apply_routing_groups(model, par)
    apply_tp(model, par.tp_mesh, cfg.parallel.etp)
    left_out = apply_fsdp(model, par) if cfg.parallel.fsdp else []
    dense, expert = split_params(model)
    sync = GradientSync(dense, expert, par, cfg.parallel.grad_bucket_mb)
    return Built(par, model, left_out, sync, dense, expert)


def _ranks(group) -> list[int]:
    return list(dist.get_process_group_ranks(group))


def _placement_key(pl) -> tuple:
    if pl.is_shard():
        return ("S", pl.dim)
    return ("R",) if pl.is_replicate() else ("P",)


@dataclass(frozen=True)
class Spec:
    """How one parameter is laid out on a rank, in a form comparable across ranks."""
    logical: tuple            # the whole parameter: all experts / all PEER rows
    dt_shape: tuple           # the DTensor's global shape (or the plain tensor's shape)
    mesh_names: tuple         # () for a plain tensor
    placements: tuple         # (("S", d) | ("R",) | ("P",), ...)
    slot_rows: int            # rows per EP slot along dim 0 (experts / PEER rows), 0 = none
    tp_split: bool            # the design says TP shards it
    fsdp_split: bool          # FSDP manages it
    expert: bool


@dataclass
class RankView:
    rank: int
    specs: dict = field(default_factory=dict)          # name -> Spec
    slot_offset: dict = field(default_factory=dict)    # name -> first expert id / PEER row here
    ckpt: dict = field(default_factory=dict)           # key -> (global shape, placements on BASE_AXES)
    expert_ids: dict = field(default_factory=dict)     # expert tensor name -> sorted global ids
    alias: dict = field(default_factory=dict)          # tied parameter name -> its canonical name


class Report:
    def __init__(self):
        self.failures: list[str] = []
        self.checks = 0

    def check(self, cond: bool, msg) -> None:
        self.checks += 1
        if not cond:
            self.failures.append(msg() if callable(msg) else msg)


def _tp_split_by_design(name: str, owner, modules: dict, cfg) -> bool:
    """Which parameters model/tp_plan.py shards over tp (tp > 1): attention and SwiGLU linears
    (dense FFNs, shared experts), embedding and head, and with etp the routed experts."""
    from moetrain.moe.experts import GroupedExperts, SwiGLU
    from moetrain.model.transformer import Attention
    if cfg.parallel.tp == 1:
        return False
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if name in ("embed.weight", "head.weight"):
        return True
    if isinstance(owner, GroupedExperts):
        return cfg.parallel.etp
    if isinstance(owner, nn.Linear) and leaf == "weight" and parent in TP_LINEAR:
        grand = modules.get(name.rsplit(".", 2)[0])
        return isinstance(grand, (Attention, SwiGLU))
    return False


def observe_rank(cfg, b: Built, arith: Arith, rep: Report, world1_keys: dict) -> RankView:
    """Check one built rank against the arithmetic and return its view for the cross-rank checks."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from moetrain.checkpoint.state import expected_model, mesh_sizes, model_entries, parse_model_key
    from moetrain.moe.dispatch import AllToAllDispatcher, LocalDispatcher, RowShardDispatcher
    from moetrain.moe.experts import GroupedExperts
    from moetrain.moe.layer import MoELayer
    from moetrain.moe.peer import PEERLayer
    from moetrain.parallel.apply import is_expert_param, is_peer_table
    from moetrain.parallel.grads import _shard_groups

    par, model, r = b.par, b.model, b.par.rank
    c = arith.coord(r)
    where = f"rank {r}"
    view = RankView(r)

    # ---- groups and the root mesh
    rep.check((par.tp_rank, par.dp_rank, par.ep_rank, par.edp_rank) == (c["tp"], c["dp"], c["ep"], c["edp"]),
              f"{where}: Parallel says (tp, dp, ep, edp) = {(par.tp_rank, par.dp_rank, par.ep_rank, par.edp_rank)}, "
              f"arithmetic {(c['tp'], c['dp'], c['ep'], c['edp'])}")
    rep.check(_ranks(par.world_group) == list(range(arith.world)), f"{where}: world group is not 0..W-1")
    for axis, group in (("tp", par.tp_group), ("ep", par.ep_group), ("edp", par.edp_group), ("dp", par.dp_group)):
        got, want = _ranks(group), arith.group(r, axis)
        rep.check(got == want, lambda: f"{where}: {axis} group {got[:8]}{'...' if len(got) > 8 else ''} "
                                       f"!= expected {want[:8]}")
        rep.check(dist.get_group_rank(group, r) == c[axis], f"{where}: index in its {axis} group "
                  f"{dist.get_group_rank(group, r)} != {c[axis]}")
    rep.check(tuple(par.mesh.mesh_dim_names) == BASE_AXES and torch.equal(par.mesh.mesh, arith.grid),
              f"{where}: root mesh {par.mesh.mesh_dim_names} {tuple(par.mesh.mesh.shape)} is not arange(W) "
              f"as (edp, ep, tp) = {tuple(arith.grid.shape)}")
    rep.check(list(par.mesh.get_coordinate()) == arith.mesh_coord(r, BASE_AXES),
              f"{where}: mesh coordinate {par.mesh.get_coordinate()} != {arith.mesh_coord(r, BASE_AXES)}")

    # ---- experts and their dispatchers
    modules = dict(model.named_modules())
    ep = arith.ep
    for name, mod in modules.items():
        if isinstance(mod, MoELayer):
            E = mod.num_experts
            L = E // ep
            ge = mod.experts
            rep.check(ge.expert_offset == c["ep"] * L and ge.num_experts == L,
                      f"{where}: {name} holds experts [{ge.expert_offset}, +{ge.num_experts}), its EP slot "
                      f"{c['ep']} is [{c['ep'] * L}, +{L})")
            for w in ("w1", "w2", "w3"):
                rep.check(getattr(ge, w).shape[0] == L, f"{where}: {name}.experts.{w} has {getattr(ge, w).shape[0]} "
                          f"experts, not {L}")
            d = mod.dispatcher
            if ep == 1:
                rep.check(isinstance(d, LocalDispatcher), f"{where}: {name}: ep=1 but {type(d).__name__}")
            else:
                rep.check(isinstance(d, AllToAllDispatcher) and d.ep_rank == c["ep"] and d.ep_size == ep
                          and d.num_experts == E and _ranks(d.group) == arith.group(r, "ep"),
                          f"{where}: {name}'s dispatcher does not exchange over its EP group as slot {c['ep']}")
        elif isinstance(mod, PEERLayer):
            rows = mod.num_experts // ep
            rep.check(mod.row_offset == c["ep"] * rows and mod.expert_down.shape[0] == rows,
                      f"{where}: {name} holds PEER rows [{mod.row_offset}, +{mod.expert_down.shape[0]}), "
                      f"its EP slot is [{c['ep'] * rows}, +{rows})")
            if ep > 1:
                d = mod.dispatcher
                rep.check(isinstance(d, RowShardDispatcher) and d.size == ep and _ranks(d.group) == arith.group(r, "ep"),
                          f"{where}: {name}'s PEER dispatcher is not over its EP group")

    # ---- parameters
    left_out = set(b.left_out)
    param_block: dict = {}       # name -> ((offset, size) per dim) of the logical parameter held here
    sync_group = {}
    for red in b.sync.reducers:
        for bucket in red.buckets:
            for p in bucket:
                sync_group[id(p)] = _ranks(red.group)
    for name, p in model.named_parameters():
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = modules.get(owner_name)
        is_exp = is_expert_param(name, modules)
        slot_rows, offset = 0, 0
        if isinstance(owner, GroupedExperts):
            slot_rows, offset = owner.num_experts, owner.expert_offset
        elif is_peer_table(name, modules):
            slot_rows, offset = p.shape[0], owner.row_offset
        local = p.to_local() if isinstance(p, DTensor) else p
        if isinstance(p, DTensor):
            names = tuple(p.device_mesh.mesh_dim_names)
            placements = tuple(_placement_key(x) for x in p.placements)
            got_mesh = p.device_mesh.mesh
            want_mesh = arith.submesh(r, names)
            rep.check(torch.equal(got_mesh, want_mesh), f"{where}: {name} lives on mesh {names} "
                      f"{got_mesh.flatten().tolist()[:8]}, arithmetic {want_mesh.flatten().tolist()[:8]}")
            rep.check(list(p.device_mesh.get_coordinate()) == arith.mesh_coord(r, names),
                      f"{where}: {name}: coordinate {p.device_mesh.get_coordinate()} on {names}")
            args = (tuple(p.shape), tuple(want_mesh.shape), tuple(arith.mesh_coord(r, names)), placements)
            want_local, want_off = _torch_block(*args)
            rep.check(_block(*args) == tuple(zip(want_off, want_local)),
                      f"{where}: {name}: block arithmetic disagrees with torch's")
            rep.check(tuple(local.shape) == tuple(want_local), f"{where}: {name} local shape {tuple(local.shape)} "
                      f"!= {tuple(want_local)} from its placements {placements}")
            rep.check(not any(pl[0] == "P" for pl in placements), f"{where}: {name} is a Partial parameter")
            if slot_rows:
                rep.check(all(pl != ("S", 0) for pl in placements),
                          f"{where}: {name}: an expert weight sharded on its expert dim 0")
        else:
            names, placements = (), ()
        logical = tuple(p.shape) if not slot_rows else (slot_rows * ep,) + tuple(p.shape[1:])
        if isinstance(p, DTensor):           # torch's own arithmetic at this rank's real coordinate
            size, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            blk = list(zip(off, size))
        else:
            blk = [(0, n) for n in p.shape]
        if slot_rows:
            blk[0] = (offset + blk[0][0], blk[0][1])
        param_block[name] = tuple(blk)
        tp_split = _tp_split_by_design(name, owner, modules, cfg)
        fsdp_split = bool(cfg.parallel.fsdp) and arith.dp > 1 and name not in left_out
        if is_peer_table(name, modules):
            fsdp_split = False
        spec = Spec(logical, tuple(p.shape), names, placements, slot_rows, tp_split, fsdp_split, is_exp)
        view.specs[name] = spec
        view.slot_offset[name] = offset
        tp_sharded = any(n == "tp" and pl[0] == "S" for n, pl in zip(names, placements))
        rep.check(tp_sharded == tp_split, f"{where}: {name}: TP-sharded {tp_sharded}, tp_plan says {tp_split}")
        fs_axis = "edp" if is_exp else "dp"
        fs_sharded = any(n == fs_axis and pl[0] == "S" for n, pl in zip(names, placements))
        rep.check(fs_sharded == fsdp_split, f"{where}: {name}: FSDP-sharded over {fs_axis} {fs_sharded}, "
                  f"expected {fsdp_split} (left out: {name in left_out})")

        # gradient norm: the groups it sums squares over, x the local size, = the logical size
        groups = _shard_groups(p) + ((par.ep_group,) if is_exp and ep > 1 else ())
        counted = math.prod(len(_ranks(g)) for g in groups) * local.numel()
        rep.check(counted == math.prod(logical), f"{where}: {name}: the norm counts {counted} elements, "
                  f"the parameter has {math.prod(logical)}")
        # gradient sum: GradientSync's group (plain params) or none (FSDP), x tp if whole on TP ranks
        want_sync = arith.group(r, "edp" if is_exp else "dp")
        rep.check(sync_group.get(id(p)) == (None if fsdp_split or len(want_sync) == 1 else want_sync),
                  f"{where}: {name}: GradientSync sums it over {sync_group.get(id(p))}")

    # ---- checkpoint keys (a tied weight is a key under each of its names)
    canonical = {id(p): n for n, p in model.named_parameters()}
    view.alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    entries = model_entries(model, par.mesh)
    for key, t in entries.items():
        name, g = parse_model_key(key)
        if isinstance(t, DTensor):
            rep.check(tuple(t.device_mesh.mesh_dim_names) == BASE_AXES and torch.equal(t.device_mesh.mesh, arith.grid),
                      f"{where}: checkpoint {key} is not on the (edp, ep, tp) root mesh")
            view.ckpt[key] = (tuple(t.shape), tuple(_placement_key(x) for x in t.placements))
            size, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            rep.check(tuple(size) == tuple(t.to_local().shape), f"{where}: checkpoint {key} says a local shape "
                      f"{tuple(size)}, its data is {tuple(t.to_local().shape)}")
            ck_block = tuple(zip(off, size))
        else:
            view.ckpt[key] = (tuple(t.shape), tuple(("R",) for _ in BASE_AXES))
            ck_block = tuple((0, n) for n in t.shape)
        # the block DCP would write for this key = the block of the parameter this rank holds
        canon = view.alias.get(name)
        if canon in param_block:
            blk = param_block[canon]
            if g is not None:            # one expert's slice: the expert dim is the key
                rep.check(blk[0][0] <= g < blk[0][0] + blk[0][1], f"{where}: checkpoint {key}: expert {g} "
                          f"is not held here")
                blk = blk[1:]
            rep.check(ck_block == blk, lambda: f"{where}: checkpoint {key} describes block {ck_block}, the rank "
                                               f"holds {blk} of {canon}")
        if g is not None:
            view.expert_ids.setdefault(name, []).append(g)
    for name in view.expert_ids:
        view.expert_ids[name].sort()
        pl = view.specs.get(name)
        rows = pl.slot_rows if pl else len(view.expert_ids[name])
        want = list(range(c["ep"] * rows, (c["ep"] + 1) * rows))
        rep.check(view.expert_ids[name] == want, f"{where}: checkpoint keys of {name} name experts "
                  f"{view.expert_ids[name][:4]}..., its EP slot holds {want[:1]}..{want[-1:]}")
    exp_layout = expected_model(model, mesh_sizes(par.mesh))
    rep.check({k: v[0] for k, v in exp_layout.items()} == world1_keys,
              f"{where}: the checkpoint's global keys/shapes differ from the world-1 model's")
    mine = {k: s for k, (s, _) in view.ckpt.items()}
    want_mine = {k: s for k, s in world1_keys.items()
                 if parse_model_key(k)[1] is None or k in mine}
    rep.check(mine == want_mine and all(k in world1_keys for k in mine),
              f"{where}: checkpoint keys/global shapes differ from the world-1 model's "
              f"({len(set(mine) ^ set(want_mine))} keys differ)")
    return view


def world1_model_keys(cfg) -> dict:
    """{checkpoint key: global shape} of the unsharded model (the layout-free reference)."""
    from moetrain.checkpoint.state import expected_model
    from moetrain.model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v[0] for k, v in expected_model(model, {}).items()}


# ----------------------------------------------------------------------------- across ranks


def _partition(blocks: Counter, shape: tuple, R: int) -> Optional[str]:
    """None when the distinct blocks ((offset, size) per dim) tile `shape` exactly and each is held
    by R ranks; else why not. Blocks of a Shard placement form a grid: per dim the distinct
    intervals must tile [0, n), and every combination of them must occur."""
    bad = {blk: n for blk, n in blocks.items() if n != R}
    if bad:
        blk, n = next(iter(bad.items()))
        return f"block {blk} is held by {n} ranks, expected {R} ({len(bad)} of {len(blocks)} blocks wrong)"
    blocks = {blk: n for blk, n in blocks.items() if all(sz > 0 for _, sz in blk)}
    per_dim = [sorted({blk[d] for blk in blocks}) for d in range(len(shape))]
    for d, ivs in enumerate(per_dim):
        pos = 0
        for off, sz in ivs:
            if off != pos:
                return f"dim {d}: intervals {ivs[:6]} do not tile [0, {shape[d]})"
            pos = off + sz
        if pos != shape[d]:
            return f"dim {d}: intervals end at {pos}, not {shape[d]}"
    if len(blocks) != math.prod(len(v) for v in per_dim):
        return f"{len(blocks)} distinct blocks are not the grid of the per-dim intervals"
    return None


@functools.lru_cache(maxsize=None)
def _torch_block(shape: tuple, mesh_shape: tuple, coord: tuple, placements: tuple) -> tuple:
    """(local shape, global offset) by torch's N-D DTensor arithmetic."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    pls = [Shard(p[1]) if p[0] == "S" else Replicate() for p in placements]
    return _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), pls)


@functools.lru_cache(maxsize=None)
def _chunk(n: int, mesh_size: int, coord: int, dim: int, ndim: int) -> tuple[int, int]:
    """(offset, size) of chunk `coord` of a dim of n elements split over `mesh_size` ranks, as
    torch's own DTensor arithmetic computes it (Shard(dim) on a 1-D mesh)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    shape = tuple(n if d == dim else 1 for d in range(ndim))
    size, off = _compute_local_shape_and_global_offset(shape, (mesh_size,), [coord], [Shard(dim)])
    return off[dim], size[dim]


@functools.lru_cache(maxsize=None)
def _block(shape: tuple, mesh_shape: tuple, coord: tuple, placements: tuple) -> tuple:
    """((offset, size) per tensor dim) of the block a rank at `coord` holds of a DTensor. A
    tensor dim sharded by several mesh dims (nested) goes to torch's N-D arithmetic whole."""
    dims = [p[1] for p in placements if p[0] == "S"]
    if len(dims) != len(set(dims)):
        size, off = _torch_block(shape, mesh_shape, coord, placements)
        return tuple(zip(off, size))
    out = [(0, n) for n in shape]
    for i, p in enumerate(placements):
        if p[0] == "S":
            out[p[1]] = _chunk(shape[p[1]], mesh_shape[i], coord[i], p[1], len(shape))
    return tuple(out)


def cross_rank_checks(cfg, arith: Arith, views: list[RankView], rep: Report, all_slots: bool) -> dict:
    """SPMD agreement, ownership counts, gradient groups and checkpoint coverage over ALL ranks."""
    from moetrain.checkpoint.state import parse_model_key
    W = arith.world
    first = views[0]
    for v in views[1:]:
        same = {n for n in first.specs if v.specs.get(n) == first.specs[n]}
        rep.check(set(v.specs) == set(first.specs) and same == set(first.specs),
                  f"rank {v.rank} lays out {sorted(set(first.specs) - same)[:3]} unlike rank {first.rank}")
    stats = {"params": len(first.specs), "ckpt_keys": 0}
    if cfg.parallel.fsdp and arith.dp > 1:
        # parameters FSDP leaves whole (no dim the dp / edp size divides): the loop all-reduces
        # them; their share of the model's elements is memory FSDP does not save
        left = [s for s in first.specs.values() if not s.fsdp_split]
        stats["fsdp_left_out"] = len(left)
        stats["fsdp_left_out_frac"] = sum(math.prod(s.logical) for s in left) / \
            sum(math.prod(s.logical) for s in first.specs.values())

    # ---- ownership of every parameter element, over all W ranks
    for_spec: dict = {}
    for name, s in first.specs.items():
        for_spec.setdefault(s, []).append(name)
    coords = [arith.coord(r) for r in range(W)]
    for s, names in for_spec.items():
        fsdp_axis = "edp" if s.expert else "dp"
        R = (1 if s.fsdp_split else arith.sizes[fsdp_axis]) * (1 if s.tp_split else arith.tp)
        mesh_shape = tuple(arith.sizes[n] for n in s.mesh_names)
        blocks: Counter = Counter()
        holders: dict = {}
        cache: dict = {}
        for r in range(W):
            c = coords[r]
            key = tuple(c[n] for n in s.mesh_names)
            if key not in cache:
                cache[key] = _block(s.dt_shape, mesh_shape, key, s.placements) if s.mesh_names else \
                    tuple((0, n) for n in s.dt_shape)
            blk = cache[key]
            if s.slot_rows:
                (o0, n0), rest = blk[0], blk[1:]
                blk = ((c["ep"] * s.slot_rows + o0, n0),) + rest
            blocks[blk] += 1
            holders.setdefault(blk, []).append(r)
        why = _partition(blocks, s.logical, R)
        rep.check(why is None, lambda: f"{names[0]} (+{len(names) - 1} alike) at {W} ranks: {why}")
        # replicas of a sampled rank's block = its gradient-sum group x (tp group if whole on tp)
        for v in views:
            c = coords[v.rank]
            blk = next(b for b, rs in holders.items() if v.rank in rs)
            sync = [v.rank] if s.fsdp_split or arith.sizes[fsdp_axis] == 1 else arith.group(v.rank, fsdp_axis)
            tp = [v.rank] if s.tp_split else arith.group(v.rank, "tp")
            want = sorted({a - c["tp"] + (t % arith.tp) for a in sync for t in tp})
            rep.check(sorted(holders[blk]) == want, f"rank {v.rank}: {names[0]}: its block is held by "
                      f"{sorted(holders[blk])[:8]}, its gradient groups span {want[:8]}")

    # ---- checkpoint: ids per EP slot, and DCP's view of every key
    slots: dict = {}
    for v in views:
        slots.setdefault(arith.coord(v.rank)["ep"], []).append(v)
    for ep_i, vs in slots.items():
        for v in vs[1:]:
            rep.check(v.expert_ids == vs[0].expert_ids, f"ranks {vs[0].rank} and {v.rank} share EP slot {ep_i} "
                      "but name different experts")
    expert_names = set(first.expert_ids)
    for name in expert_names:
        seen: Counter = Counter()
        for vs in slots.values():
            seen.update(vs[0].expert_ids[name])
        rep.check(all(n == 1 for n in seen.values()), f"{name}: an expert id is named by two EP slots")
        if all_slots:
            E = first.specs[name].logical[0] if name in first.specs else None
            rep.check(len(slots) == arith.ep and sorted(seen) == list(range(E)),
                      f"{name}: the EP slots' expert ids {sorted(seen)[:6]}... are not 0..{E - 1} "
                      f"({len(slots)} of {arith.ep} slots sampled)")
    mesh_shape = tuple(arith.sizes[a] for a in BASE_AXES)
    by_spec: dict = {}
    def replicas(name: str, is_exp: bool) -> int:
        s = first.specs.get(first.alias.get(name, name))
        if s is None:            # a persistent buffer: whole on each of its holders
            return W // (arith.ep if is_exp else 1)
        fsdp_axis = "edp" if s.expert else "dp"
        return (1 if s.fsdp_split else arith.sizes[fsdp_axis]) * (1 if s.tp_split else arith.tp)

    for v in views:
        for key, (shape, pls) in v.ckpt.items():
            name, g = parse_model_key(key)
            by_spec.setdefault((g is not None, shape, pls, replicas(name, g is not None)), set()).add(key)
    stats["ckpt_keys"] = len(set().union(*by_spec.values()))
    base_coords = [tuple(coords[r][a] for a in BASE_AXES) for r in range(W)]
    ep0 = arith.coord(first.rank)["ep"]
    for (is_exp, shape, pls, R), keys in by_spec.items():
        # holders: all ranks for a dense key; for an expert key, the ranks of its EP slot (all
        # slots are alike: the first sampled rank's stands for each)
        blocks = Counter(_block(shape, mesh_shape, base_coords[r], pls) for r in range(W)
                         if not is_exp or coords[r]["ep"] == ep0)
        why = _partition(blocks, shape, R)
        rep.check(why is None, lambda: f"checkpoint {sorted(keys)[0]} (+{len(keys) - 1} alike) as DCP sees it: {why}")
    return stats


# ----------------------------------------------------------------------------- driver


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of a traceback (the place moetrain's code failed)."""
    import traceback
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def sample_ranks(world: int, n_random: int, seed: int, arith: Optional[Arith] = None, all_slots: bool = False) -> list[int]:
    ranks = {0, min(1, world - 1), world // 2, world - 1}
    rng = random.Random(seed * 7919 + world)
    ranks |= {rng.randrange(world) for _ in range(n_random)}
    if all_slots and arith is not None:
        have = {arith.coord(r)["ep"] for r in ranks}
        for e in range(arith.ep):
            if e not in have:
                edp_i, tp_i = rng.randrange(arith.edp), rng.randrange(arith.tp)
                ranks.add((edp_i * arith.ep + e) * arith.tp + tp_i)
    return sorted(ranks)


@dataclass
class Result:
    config: str
    world: int
    layout: Layout
    ranks: list
    checks: int
    failures: list
    seconds: float
    cpu_seconds: float = 0.0
    params: int = 0
    ckpt_keys: int = 0
    fsdp_left_out: int = 0              # parameters FSDP leaves whole (FSDP layouts)
    fsdp_left_out_frac: float = 0.0     # their share of the model's elements


def check_layout(config: str, world: int, layout: Layout, extra: tuple = (), n_random: int = 3,
                 seed: int = 0, all_slots: bool = False) -> Result:
    """Build and check the sampled ranks of one layout; never raises for a failed check."""
    from moetrain.config import validate_layout
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = layout_config(config, world, layout, extra)
    dp, tp, ep = validate_layout(cfg, world)
    arith = Arith(world, dp, tp, ep)
    ranks = sample_ranks(world, n_random, seed, arith, all_slots)
    rep = Report()
    ref = world1_model_keys(cfg)
    views = []
    for r in ranks:
        with fake_world(r, world):
            try:
                built = build_rank(cfg, world, r)
                views.append(observe_rank(cfg, built, arith, rep, ref))
            except Exception as exc:       # a broken layout may crash moetrain's code: that is a finding
                rep.check(False, f"rank {r}: {type(exc).__name__}: {first_line(exc)[:300]} "
                                 f"(at {_where(exc)})")
            built = None
    stats = {}
    if views and len(views) == len(ranks):
        try:
            stats = cross_rank_checks(cfg, arith, views, rep, all_slots)
        except Exception as exc:
            rep.check(False, f"across ranks: {type(exc).__name__}: {first_line(exc)[:300]} (at {_where(exc)})")
    return Result(config, world, layout, ranks, rep.checks, rep.failures, time.perf_counter() - t0,
                  time.process_time() - c0, **stats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world", type=int, action="append", required=True, help="world size (repeatable)")
    ap.add_argument("--layout", action="append", required=True, help="tp=N,ep=N[,fsdp][,etp] (repeatable)")
    ap.add_argument("--random", type=int, default=3, help="random ranks sampled besides 0, 1, W/2, W-1")
    ap.add_argument("--all-ep-slots", action="store_true", help="also sample one rank in every EP slot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), e.g. model.n_layers=4")
    args = ap.parse_args(argv)
    from moetrain.config import ConfigError
    rows, bad = [], 0
    print(f"{'world':>6} {'layout':<20} {'ranks':>5} {'params':>6} {'ckpt keys':>9} {'checks':>8} {'s':>6} "
          f"{'FSDP left out':>16}  result")
    for world in args.world:
        for text in args.layout:
            layout = parse_layout(text)
            try:
                res = check_layout(args.config, world, layout, tuple(args.override), args.random, args.seed,
                                   args.all_ep_slots)
            except ConfigError as exc:
                print(f"{world:>6} {layout.label:<20} {'':>5} {'':>6} {'':>9} {'':>8} {'':>6} {'':>16}  invalid: {exc}")
                continue
            rows.append(res)
            ok = "ok" if not res.failures else f"FAIL ({len(res.failures)})"
            bad += bool(res.failures)
            left = f"{res.fsdp_left_out} ({100 * res.fsdp_left_out_frac:.2f}%)" if layout.fsdp else "-"
            print(f"{world:>6} {layout.label:<20} {len(res.ranks):>5} {res.params:>6} {res.ckpt_keys:>9} "
                  f"{res.checks:>8} {res.seconds:>6.1f} {left:>16}  {ok}", flush=True)
            for f in res.failures[:10]:
                print(f"         {f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
