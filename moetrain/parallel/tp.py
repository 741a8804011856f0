"""Model-agnostic pieces of tensor parallelism on DTensor (the model's plan: model/tp_plan.py).

Every TP-sharded parameter is a DTensor on the "tp" mesh whose placement (Shard(dim)) says how
it is split: its global tensor is the concatenation of the ranks' shards along that dim, which is
what gradient-norm accounting (parallel/grads.py), FSDP (parallel/fsdp.py), checkpoints
(checkpoint/state.py) and parameter counting read. Shards are slices of fully initialized weights
(distribute_tensor with src_data_rank=None: each rank keeps its chunk, nothing is sent).

  LocalShardParallel  a ParallelStyle for a module whose forward computes on plain tensors
                      (GroupedExperts): DTensor parameters, plain local shards inside forward
  read_params_as      what a module's forward reads for a parameter; grad_as_placed keeps a
                      gradient in its parameter's placements
  cross_entropy_sum   token CE; vocab-sharded logits (a DTensor) go through loss_parallel
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel


def read_params_as(module: nn.Module, names, view) -> None:
    """While `module` runs forward, its parameters `names` read as view(parameter): an instance
    attribute shadows the registered parameter from the forward pre-hook to the forward hook
    (FSDP's pre-hook, prepended, has put the unsharded parameter in place by then)."""
    def pre(mod, args):
        mod.__dict__.update({name: view(mod._parameters[name]) for name in names})

    def post(mod, args, out):
        for name in names:
            mod.__dict__.pop(name, None)
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


class _GradAsPlaced(torch.autograd.Function):
    """Identity on a DTensor whose backward redistributes the gradient to its placements."""

    @staticmethod
    def forward(ctx, p):
        ctx.placements = p.placements
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad):
        return grad.redistribute(placements=ctx.placements)


def grad_as_placed(p: DTensor) -> DTensor:
    """p, with its gradient brought to p's own placements (DTensor's embedding backward, for one,
    makes a Replicate gradient for a Shard(0) table: redistributing it takes the local rows)."""
    return _GradAsPlaced.apply(p)


class LocalShardParallel(ParallelStyle):
    """Shard the module's parameters `dims` ({name: tensor dim}) over the tp mesh, for a forward
    that runs on plain tensors: while it runs, each name reads as this rank's local shard (a
    view of the DTensor's data, differentiable into its gradient). The first input arrives
    replicated and its gradient is summed over tp (Megatron's f); the output is a partial sum,
    all-reduced to a replica (Megatron's g): a column-parallel then row-parallel pair."""

    def __init__(self, dims: dict[str, int]):
        self.dims = dims

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        def partition(_name, mod, mesh):
            for name, dim in self.dims.items() if mod is module else ():
                full = getattr(mod, name)
                sharded = distribute_tensor(full.detach(), mesh, [Shard(dim)], src_data_rank=self.src_data_rank)
                mod.register_parameter(name, nn.Parameter(sharded, requires_grad=full.requires_grad))

        def inputs(mod, args, mesh):
            x = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
            return (x.to_local(grad_placements=[Partial()]),) + tuple(args[1:])

        def outputs(mod, out, mesh):
            partial = DTensor.from_local(out, mesh, [Partial()], run_check=False)
            return partial.redistribute(placements=[Replicate()]).to_local()

        distribute_module(module, mesh, partition, inputs, outputs)
        read_params_as(module, list(self.dims), DTensor.to_local)
        return module


class _LossParallelCE(torch.autograd.Function):
    """Summed F.cross_entropy under loss_parallel in forward AND backward (loss_parallel needs
    its context around both; the trainer's backward() runs elsewhere): the forward builds the
    loss graph on a detached copy of the logits, the backward runs it inside the context."""

    @staticmethod
    def forward(ctx, logits_NV, target_N):
        with torch.enable_grad(), loss_parallel():
            ctx.logits = logits_NV.detach().requires_grad_()
            ctx.loss = F.cross_entropy(ctx.logits, target_N, reduction="sum")
        return ctx.loss.detach().to_local()

    @staticmethod
    def backward(ctx, grad):
        loss, logits = ctx.loss, ctx.logits
        del ctx.loss, ctx.logits
        with loss_parallel():
            loss.backward(DTensor.from_local(grad, loss.device_mesh, loss.placements, run_check=False))
        return logits.grad, None


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of token CE in fp32, a plain tensor. Logits sharded on the vocab dim over tp (a
    DTensor, the head under TP) use loss_parallel: no rank gathers the vocab, and every TP rank
    gets the same sum (each differentiates one copy of it)."""
    logits_NV = logits.float().reshape(-1, logits.shape[-1])
    target_N = target.reshape(-1)
    if isinstance(logits_NV, DTensor):
        return _LossParallelCE.apply(logits_NV, target_N)
    return F.cross_entropy(logits_NV, target_N, reduction="sum")
