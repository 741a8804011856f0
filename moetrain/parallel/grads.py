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
TP rank (parallel/tp.py). Only the norm has to sum the shards over tp.
Under FSDP (parallel/fsdp.py) the managed parameters are DTensor shards whose gradients FSDP
has already reduce-scattered (as a SUM): sync skips them, and the norm sums each shard's squares
over its FSDP mesh before the tp/ep sums below.
"""
from __future__ import annotations

import math

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
                nbytes = p.numel() * p.element_size()
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
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
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
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p)
                offset += n
        self._reset()


class GradientSync:
    """The loop's gradient reduction (see the module docstring): dense params over dp, expert
    params over edp, each through a BucketedAllReduce; FSDP-managed parameters (DTensors) are
    left out (FSDP reduce-scattered them in backward)."""

    def __init__(self, dense: list, expert: list, par, bucket_mb: float):
        d = par.dims
        bucket_bytes = bucket_mb * 2 ** 20
        self.reducers = []
        for params, group, size in ((dense, par.dp_group, d.dp), (expert, par.edp_group, d.edp)):
            plain = [p for p in params if not _is_dtensor(p)]
            if size > 1 and plain:
                self.reducers.append(BucketedAllReduce(plain, group, bucket_bytes))

    def arm(self) -> None:
        for r in self.reducers:
            r.arm()

    def finish(self) -> None:
        for r in self.reducers:
            r.finish()


def _is_dtensor(p) -> bool:
    return isinstance(p, DTensor)


def grad_sq_norms(dense: list, expert: list, ep_group=None, ep: int = 1, tp_group=None, tp: int = 1) -> dict:
    """Squared L2 norms of the synced gradients, each logical parameter counted once:
    {"dense", "dense_tp", "expert", "expert_tp"} (fp32 scalars, equal on every rank).

      dense (whole)  identical on every rank of the mesh (summed over dp; complete on every TP
                     rank, see parallel/tp.py): counted as is
      dense TP shard differs across tp, identical across dp: summed over tp
      expert         differs across ep (other experts), identical across edp (and tp unless
                     etp): summed over ep
      expert TP shard (etp) differs across ep and tp: summed over ep and tp
    """
    from moetrain.parallel.tp import tp_shard_dim

    # the parameters' device (a rank without any gradient still joins the all-reduces below, and
    # on NCCL with a tensor on its GPU)
    device = next((p.device for p in list(dense) + list(expert)), torch.device("cpu"))

    def sq(params):
        gs = [p.grad for p in params if p.grad is not None]
        if not gs:
            return torch.zeros((), dtype=torch.float32, device=device)
        # one multi-tensor kernel for all norms instead of two small kernels per parameter
        return torch.stack(torch._foreach_norm(gs)).float().pow(2).sum()

    def split(params):
        whole = [p for p in params if tp_shard_dim(p) is None]
        return whole, [p for p in params if tp_shard_dim(p) is not None]

    plain_dense = [p for p in dense if not _is_dtensor(p)]
    plain_expert = [p for p in expert if not _is_dtensor(p)]
    d_whole, d_tp = split(plain_dense)
    e_whole, e_tp = split(plain_expert)
    vals = torch.stack([sq(d_whole), sq(d_tp), sq(e_whole), sq(e_tp)])
    vals = vals + _fsdp_sq_norms(dense, expert, device)
    if ep > 1:
        ep_part = vals[2:].clone()
        dist.all_reduce(ep_part, group=ep_group)
        vals = torch.cat([vals[:2], ep_part])
    if tp > 1:
        tp_part = vals[1::2].clone()           # the TP-sharded kinds
        dist.all_reduce(tp_part, group=tp_group)
        vals = torch.stack([vals[0], tp_part[0], vals[2], tp_part[1]])
    vals = vals.cpu()
    return {"dense": vals[0], "dense_tp": vals[1], "expert": vals[2], "expert_tp": vals[3]}


def _fsdp_sq_norms(dense: list, expert: list, device) -> torch.Tensor:
    """The four kinds' squared norms over FSDP shards (DTensor grads): each rank of an FSDP mesh
    holds a disjoint block, so the local squares are summed over that mesh (in parameter order,
    the same on every rank). The result is what the unsharded parameters would give."""
    from moetrain.parallel.tp import tp_shard_dim

    buckets: dict = {}          # mesh group -> [4] partial squares
    for kind_base, params in ((0, dense), (2, expert)):
        for p in params:
            if not _is_dtensor(p):
                continue
            # every rank registers every mesh (grad or not), so all join the same all-reduces
            acc = buckets.setdefault(p.device_mesh.get_group(), torch.zeros(4, dtype=torch.float32, device=device))
            if p.grad is not None:
                acc[kind_base + (tp_shard_dim(p) is not None)] += p.grad.to_local().float().pow(2).sum()
    total = torch.zeros(4, dtype=torch.float32, device=device)
    for group, acc in buckets.items():
        dist.all_reduce(acc, group=group)
        total += acc
    return total


def clip_grad_norm(dense: list, expert: list, max_norm: float, ep_group, ep: int,
                   tp_group=None, tp: int = 1) -> float:
    """One global L2 norm over all parameters, as if the model lived in one process (see
    grad_sq_norms for how each kind of parameter is counted). Returns the norm before clipping."""
    total = math.sqrt(float(sum(grad_sq_norms(dense, expert, ep_group, ep, tp_group, tp).values())))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        grads = [p.grad for p in list(dense) + list(expert) if p.grad is not None]
        for kind in (True, False):        # DTensor and plain gradients do not mix in one foreach call
            same = [g for g in grads if _is_dtensor(g) == kind]
            if same:
                torch._foreach_mul_(same, scale)
    return total
