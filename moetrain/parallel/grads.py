"""Gradient synchronization and clipping across the mesh.

The trainer scales every micro-step loss by 1/(tokens in the GLOBAL batch), so each rank's
gradient is its share of the global mean: the right reduction is a SUM, never an average.
  dense params  : SUM over dp   (every dp rank saw different tokens)
  expert params : SUM over edp  (the all-to-all backward already summed the contributions of
                  every rank in the EP group; edp replicas saw the remaining tokens)
Averaging instead (DDP's default) would shrink expert gradients by ep relative to dense ones —
the classic bug that tests/parallel/test_cross_layout.py guards against. The sums run in buckets
launched during the last micro-step's backward (BucketedAllReduce), overlapping communication
with the rest of the backward as DDP does.
Tensor parallelism adds no reduction: the dp and edp groups hold the ranks with the same tp
index, hence the same shard, and replicated parameters already hold complete gradients on every
TP rank (model/tp_plan.py); TP shards are DTensors on the tp mesh, reduced by their local data.
Under FSDP (parallel/fsdp.py) the managed parameters are DTensors sharded over dp or edp whose
gradients FSDP has already reduce-scattered (as a SUM): sync skips them. The norm reads every
DTensor's placements: a gradient's local squares are summed over each mesh dim it is sharded on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class BucketedAllReduce:
    """SUM the gradients of `params` over `group`, in buckets of about `bucket_bytes` that are
    all-reduced asynchronously while the backward of the last micro-step still runs.

    Buckets hold parameters in reverse registration order (about the order backward produces
    their gradients) and are launched strictly in bucket order, each once all of its parameters
    have their final gradient (a post-accumulate-grad hook, armed for the last micro-step only).
    Every rank therefore issues the same all-reduces in the same order, whatever its routing;
    a bucket with a parameter that got no gradient in the last micro-step waits for `finish()`,
    which launches what is left (None gradients as zeros), waits for all of them, and points each
    .grad at its slice of the reduced bucket. bucket_bytes 0: one bucket per dtype, launched in
    finish() (one flat all-reduce after the backward).
    """

    def __init__(self, params: list, group, bucket_bytes: float):
        self.group = group
        self.buckets: list[list] = []
        self._bucket_of: dict[int, int] = {}
        by_dtype: dict = {}
        for p in reversed(params):
            by_dtype.setdefault((p.dtype, p.device), []).append(p)
        for plist in by_dtype.values():
            bucket, size = [], 0
            for p in plist:
                nbytes = _local(p).numel() * p.element_size()
                if bucket and bucket_bytes > 0 and size + nbytes > bucket_bytes:
                    self.buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(p)
                size += nbytes
            self.buckets.append(bucket)
        for i, bucket in enumerate(self.buckets):
            for p in bucket:
                self._bucket_of[id(p)] = i
        self.overlap = bucket_bytes > 0
        self._armed = False
        self._reset()
        if self.overlap:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._pending: list = [None] * len(self.buckets)      # (flat, work) per launched bucket
        self._next = 0

    def arm(self) -> None:
        """Call right before the backward of the last micro-step of an optimizer step."""
        self._reset()
        self._armed = self.overlap

    def _on_grad(self, p) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._pending[i] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))
        self._next = i + 1

    def finish(self) -> None:
        """After the last backward: launch the buckets still waiting, wait for all, write back."""
        self._armed = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        for bucket, (flat, work) in zip(self.buckets, self._pending):
            work.wait()
            offset = 0
            for p in bucket:
                n = _local(p).numel()
                p.grad = _grad_like(p, flat[offset:offset + n])
                offset += n
        self._reset()


class GradientSync:
    """The loop's gradient reduction (see the module docstring): dense params over dp, expert
    params over edp, each through a BucketedAllReduce; FSDP-managed parameters (DTensors sharded
    over that group) are left out (FSDP reduce-scattered them in backward)."""

    def __init__(self, dense: list, expert: list, par, bucket_mb: float, sparse: list = ()):
        d = par.dims
        bucket_bytes = bucket_mb * 2 ** 20
        self.reducers = []
        rowwise = {id(p) for p in sparse}      # sparse-gradient expert params: SparseRowSum (below)
        for params, group, size in ((dense, par.dp_group, d.dp), (expert, par.edp_group, d.edp)):
            plain = [p for p in params if group not in _shard_groups(p) and id(p) not in rowwise]
            if size > 1 and plain:
                self.reducers.append(BucketedAllReduce(plain, group, bucket_bytes))
        if sparse:
            self.reducers.append(SparseRowSum(list(sparse), par.edp_group, d.edp))

    def arm(self) -> None:
        for r in self.reducers:
            r.arm()

    def finish(self) -> None:
        for r in self.reducers:
            r.finish()


def _is_dtensor(p) -> bool:
    return isinstance(p, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's data: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _grad_like(p: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """A flat slice of a reduced bucket as p's gradient (a DTensor placed like p for a DTensor)."""
    if not _is_dtensor(p):
        return flat.view_as(p)
    return DTensor.from_local(flat.view_as(p.to_local()), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def _shard_groups(p) -> tuple:
    """The process groups of the mesh dims a DTensor is sharded on (tp: tensor parallelism;
    dp / edp: FSDP): its ranks there hold disjoint blocks of it. () for a plain tensor."""
    if not _is_dtensor(p):
        return ()
    return tuple(p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if not pl.is_replicate())


def grad_sq_norms(dense: list, expert: list, ep_group=None, ep: int = 1, count_rows: Optional[dict] = None) -> dict:
    """Squared L2 norms of the synced gradients, each logical parameter counted once:
    {"dense", "expert"} (fp32 scalars, equal on every rank). Each rank sums the squares of the
    gradient data it holds, then sums over the ranks that hold the other parts of the parameter:
    the mesh dims its DTensor is sharded on (tp, and dp / edp under FSDP), and ep for experts
    (each EP rank holds other experts). Replicas (dp without FSDP, tp for a replicated
    parameter, edp) already agree and are counted once. count_rows (moe.placement=balanced,
    parallel/replicas.py): id(expert param) -> the indices (a list) of its dim-0 slots that count,
    so an expert replicated on several EP ranks is counted once; the slots enter the norm as views
    (no copy of the gradients, and no boolean mask whose count the host would have to read)."""
    count_rows = count_rows or {}
    # the parameters' device (a rank without any gradient still joins the all-reduces below, and
    # on NCCL with a tensor on its GPU)
    device = next((p.device for p in list(dense) + list(expert)), torch.device("cpu"))
    kinds: dict = {}            # (expert?, groups to sum over) -> local gradients
    for is_expert, params in ((0, dense), (1, expert)):
        extra = (ep_group,) if is_expert and ep > 1 else ()
        for p in params:
            # every rank registers every kind (grad or not), so all join the same all-reduces
            grads = kinds.setdefault((is_expert, _shard_groups(p) + extra), [])
            if p.grad is not None:
                rows = count_rows.get(id(p))
                g = _local(p.grad)
                grads.extend([g] if rows is None else [g[j] for j in rows])
    vals = [_sq(grads, device) for grads in kinds.values()]
    for group in dict.fromkeys(g for _, gs in kinds for g in gs):     # first-seen order: same on all ranks
        idx = [i for i, (_, gs) in enumerate(kinds) if group in gs]
        part = torch.stack([vals[i] for i in idx])
        dist.all_reduce(part, group=group)     # a sum over several groups: over one, then the next
        for j, i in enumerate(idx):
            vals[i] = part[j]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    totals = torch.stack([sum((v for (e, _), v in zip(kinds, vals) if e == kind), zero) for kind in (0, 1)]).cpu()
    return {"dense": totals[0], "expert": totals[1]}


def _sq(grads: list, device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    # one multi-tensor kernel for all norms instead of two small kernels per parameter
    return torch.stack(torch._foreach_norm([_norm_operand(g) for g in grads])).float().pow(2).sum()


def clip_grad_norm(dense: list, expert: list, max_norm: float, ep_group, ep: int,
                   count_rows: Optional[dict] = None) -> float:
    """One global L2 norm over all parameters, as if the model lived in one process (see
    grad_sq_norms for how each kind of parameter is counted: a TP or FSDP shard is a DTensor whose
    placements say where to sum). Returns the norm before clipping."""
    total = math.sqrt(float(sum(grad_sq_norms(dense, expert, ep_group, ep, count_rows).values())))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        grads = [p.grad for p in list(dense) + list(expert) if p.grad is not None]
        for kind in (True, False):        # DTensor and plain gradients do not mix in one foreach call
            same = [g for g in grads if _is_dtensor(g) == kind]
            if same:
                torch._foreach_mul_(same, scale)
    return total


# ---- sparse (rows, values) gradients: PEER expert tables with moe.peer.sparse_updates ----------

class SparseRowSum:
    """SUM sparse row gradients over `group` (edp) without densifying: each rank's coalesced
    (rows, values) are all-gathered (counts first, then both padded to the largest count) and
    coalesced again, duplicate rows adding up. O(touched rows x D) bytes, never [N, D]. With a
    group of one rank it only coalesces (autograd concatenated the micro-steps' gradients). Every
    rank calls the same collectives in parameter order, also a rank whose tokens touched none of
    a table's rows (its gradient is then an empty sparse tensor)."""

    def __init__(self, params: list, group, size: int):
        self.params, self.group, self.size = params, group, size

    def arm(self) -> None:
        pass

    def finish(self) -> None:
        for p in self.params:
            g = p.grad if p.grad is not None else _empty_rows(p)
            g = g.coalesce()
            if self.size > 1:
                g = _all_gather_rows(g, self.group, self.size)
            p.grad = g


def _empty_rows(p: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=p.device),
                                   p.new_zeros((0,) + tuple(p.shape[1:])), p.shape, is_coalesced=True,
                                   check_invariants=False)


def _all_gather_rows(g: torch.Tensor, group, size: int) -> torch.Tensor:
    rows, vals = g.indices()[0], g.values()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]          # sync ok: a sparse gradient's size is data dependent
    pad = max(counts) - rows.shape[0]
    rows_p = torch.cat([rows, rows.new_zeros(pad)])
    vals_p = torch.cat([vals, vals.new_zeros((pad,) + tuple(vals.shape[1:]))])
    all_rows = [torch.empty_like(rows_p) for _ in range(size)]
    all_vals = [torch.empty_like(vals_p) for _ in range(size)]
    dist.all_gather(all_rows, rows_p, group=group)
    dist.all_gather(all_vals, vals_p, group=group)
    rows_cat = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    vals_cat = torch.cat([v[:c] for v, c in zip(all_vals, counts)])
    return torch.sparse_coo_tensor(rows_cat.unsqueeze(0), vals_cat, g.shape, check_invariants=False).coalesce()


def _norm_operand(g: torch.Tensor) -> torch.Tensor:
    """What the norm is taken of: a sparse gradient's values (coalesced, so each row counts once;
    the same norm as its dense form), any other gradient itself."""
    return g.coalesce().values() if g.is_sparse else g
