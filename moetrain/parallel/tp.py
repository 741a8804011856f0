"""Tensor parallelism over the TP group (Megatron-style), added to a built model by `apply_tp`.

Activations between blocks stay replicated over the TP group; inside a block the work is split:
  attention   wq/wk/wv column-parallel (whole heads per rank), wo row-parallel
  dense FFN   w1/w3 column-parallel, w2 row-parallel (also the MoE layers' shared experts)
  embedding   vocab-parallel: rank r holds rows [r*V/tp, (r+1)*V/tp); lookups outside give 0
  head        column-parallel (vocab shard of the logits), loss by `vocab_parallel_cross_entropy`
  experts     replicated over tp (every TP rank routes the same tokens and exchanges them with
              its EP group: the ranks with the same tp index), or with etp=True each expert's
              w1/w3 sharded on H (column) and w2 on H (row)

A sharded block is wrapped by two conjugate functions (Megatron's f and g):
  copy_to_tp     forward: identity     backward: all-reduce(sum) of the input gradient
  reduce_from_tp forward: all-reduce   backward: identity
so every TP rank ends the backward pass holding the FULL gradient of each replicated activation,
and the gradient of a replicated parameter (norms, router, ...) is identical on every TP rank and
already complete: it needs no reduction over tp. A sharded parameter's gradient is its slice of
the full gradient. The loss is replicated too; each rank's backward differentiates ONE copy of it,
so nothing is counted tp times.

Sharding slices the fully initialized weights (init_weights before apply_tp), so a tp=2 rank holds
exactly the slices of the world-1 weights. Every sharded parameter carries `tp_shard_dim` (the
dim it was split along; `tp_shard_dim(p)` reads it) for gradient-norm accounting and
checkpointing: its global tensor is the concatenation over tp ranks along that dim.

Shape legend: N tokens, V vocab, Vl = V/tp local vocab, D dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moetrain.moe.experts import GroupedExperts, SwiGLU


def tp_shard_dim(p: torch.Tensor) -> Optional[int]:
    """The dim a TP-sharded parameter was split along, None for a parameter whole on every rank."""
    return getattr(p, "tp_shard_dim", None)


def tp_shard_dims(model: nn.Module) -> dict[str, int]:
    """{parameter fqn: shard dim} for every TP-sharded parameter (for checkpointing)."""
    return {name: d for name, p in model.named_parameters() if (d := tp_shard_dim(p)) is not None}


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if grad.numel():
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()      # never all-reduce into a tensor autograd may hold
        if out.numel():
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + Vl) of the table; the partial lookups are summed over tp."""

    def __init__(self, weight_VlD: torch.Tensor, vocab_start: int, group):
        super().__init__(weight_VlD.shape[0], weight_VlD.shape[1], _weight=weight_VlD)
        self.vocab_start, self.group = vocab_start, group

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token CE from vocab-sharded logits, in ONE collective: each rank all-gathers
    (local max m_r, local sum of exp(l - m_r), target logit if the target is local else 0), then
    logZ = logsumexp_r(m_r + log s_r) and loss = logZ - target logit, identical on every rank.
    Backward: d loss / d l = softmax(l) - onehot(target), on the local vocab shard only."""

    @staticmethod
    def forward(ctx, logits_NVl, target_N, group, tp, vocab_start):
        Vl = logits_NVl.shape[1]
        m_N = logits_NVl.detach().max(dim=1).values
        exp_NVl = torch.exp(logits_NVl - m_N[:, None])
        local = target_N - vocab_start
        mine = (local >= 0) & (local < Vl)
        idx = local.clamp(0, Vl - 1)
        tgt_N = logits_NVl.gather(1, idx[:, None]).squeeze(1) * mine
        stats = torch.stack([m_N, exp_NVl.sum(1), tgt_N])           # [3, N]
        gathered = [torch.empty_like(stats) for _ in range(tp)]
        dist.all_gather(gathered, stats, group=group)
        all_RN = torch.stack(gathered)                              # [tp, 3, N]
        logz_N = torch.logsumexp(all_RN[:, 0] + all_RN[:, 1].log(), dim=0)
        loss_N = logz_N - all_RN[:, 2].sum(0)
        exp_NVl.mul_(torch.exp(m_N - logz_N)[:, None])             # softmax on the local shard
        ctx.save_for_backward(exp_NVl, idx, mine)
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        softmax_NVl, idx, mine = ctx.saved_tensors
        grad = softmax_NVl.clone()
        grad.scatter_add_(1, idx[:, None], -mine.to(grad.dtype)[:, None])
        return grad * grad_N[:, None], None, None, None, None


def vocab_parallel_cross_entropy(logits_NVl: torch.Tensor, target_N: torch.Tensor, group, tp: int,
                                 tp_rank: int) -> torch.Tensor:
    """Per-token cross-entropy over the full vocabulary from this rank's vocab shard of the logits
    (shard r holds vocab ids [r*Vl, (r+1)*Vl)). Same value on every TP rank."""
    return _VocabParallelCE.apply(logits_NVl, target_N, group, tp, tp_rank * logits_NVl.shape[1])


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, par) -> torch.Tensor:
    """Sum of token CE in fp32; under TP the logits are a vocab shard (see apply_tp)."""
    logits_NV = logits.float().reshape(-1, logits.shape[-1])
    target_N = target.reshape(-1)
    if par.dims.tp == 1:
        return F.cross_entropy(logits_NV, target_N, reduction="sum")
    return vocab_parallel_cross_entropy(logits_NV, target_N, par.tp_group, par.dims.tp, par.tp_rank).sum()


def _shard_(mod: nn.Module, name: str, dim: int, rank: int, tp: int) -> nn.Parameter:
    full = getattr(mod, name)
    assert full.shape[dim] % tp == 0, (name, tuple(full.shape), tp)
    p = nn.Parameter(full.detach().chunk(tp, dim)[rank].clone(), requires_grad=full.requires_grad)
    p.tp_shard_dim = dim
    setattr(mod, name, p)
    return p


def _wrap_block(mod: nn.Module, group) -> None:
    """Input through copy_to_tp, output through reduce_from_tp (first positional arg / result)."""
    mod.register_forward_pre_hook(lambda m, args: (copy_to_tp(args[0], group),) + tuple(args[1:]))
    mod.register_forward_hook(lambda m, args, out: reduce_from_tp(out, group))


def _shard_swiglu(ffn: SwiGLU, rank: int, tp: int, group) -> None:
    _shard_(ffn.w1, "weight", 0, rank, tp)       # nn.Linear weight [out, in]
    _shard_(ffn.w3, "weight", 0, rank, tp)
    _shard_(ffn.w2, "weight", 1, rank, tp)
    _wrap_block(ffn, group)


def apply_tp(model: nn.Module, par, etp: bool = False) -> None:
    """Shard attention, dense FFNs, embedding and head over par.tp_group (and each expert's
    hidden dim with etp). Call AFTER init_weights: shards are slices of the full weights."""
    from moetrain.model.transformer import Attention
    tp, rank, group = par.dims.tp, par.tp_rank, par.tp_group
    if tp == 1:
        return
    for mod in list(model.modules()):
        if isinstance(mod, Attention):
            assert mod.n_heads % tp == 0, (mod.n_heads, tp)
            for lin in (mod.wq, mod.wk, mod.wv):
                _shard_(lin, "weight", 0, rank, tp)       # whole heads: rows h*Dh..(h+1)*Dh
            _shard_(mod.wo, "weight", 1, rank, tp)
            _wrap_block(mod, group)
        elif isinstance(mod, SwiGLU):
            _shard_swiglu(mod, rank, tp, group)
        elif isinstance(mod, GroupedExperts) and etp:
            # rows arrive identical on every TP rank (same routing, same EP exchange), so the
            # expert FFN is one more column/row-parallel pair over the TP group
            _shard_(mod, "w1", 2, rank, tp)
            _shard_(mod, "w3", 2, rank, tp)
            _shard_(mod, "w2", 1, rank, tp)
            mod.hidden //= tp
            _wrap_block(mod, group)

    tied = model.head.weight is model.embed.weight
    vocab = model.embed.num_embeddings
    assert vocab % tp == 0, (vocab, tp)
    weight = _shard_(model.embed, "weight", 0, rank, tp)
    model.embed = VocabParallelEmbedding(weight, rank * (vocab // tp), group)
    model.embed.weight.tp_shard_dim = 0
    if tied:
        model.head.weight = model.embed.weight
    else:
        _shard_(model.head, "weight", 0, rank, tp)
    model.head.register_forward_pre_hook(lambda m, args: (copy_to_tp(args[0], group),))
