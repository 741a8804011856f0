"""The DeepSpeed engine (`train.engine: deepspeed`): our Transformer trained through
`deepspeed.initialize` with ZeRO stage 0/1/2 (`train.zero_stage`), the DeepSpeed config generated
from ours (`ds_config`; no JSON file).

Seam: train/loop.build_trainer builds a `DeepSpeedEngine` and the Trainer sends forward, backward
and the optimizer step through it (`Trainer.engine`); data, loss, metrics and the LR schedule
(set on the engine optimizer's param groups every step) stay the loop's own.

Expert parallelism: our MoE layers keep doing the all-to-all over our EP group. DeepSpeed only
has to reduce (and ZeRO-partition) each expert parameter over the expert-data-parallel group
instead of the data-parallel one. It learns this from
  - the params: `allreduce = False`, `group_name = "ep_size_<ep>"` (deepspeed.moe.utils.is_moe_param),
    in MoE param groups made by `split_params_into_different_moe_groups_for_optimizer`;
  - its group registry (deepspeed.utils.groups), which gets OUR ep/edp groups under that name
    (parallel/mesh.py stays the only place groups are made; DeepSpeed's own layout for tp=1,
    ep groups of consecutive ranks and edp groups strided by ep, is the same as ours);
  - `engine.has_moe_layers`, set only for modules that are instances of deepspeed.moe.layer.MoE:
    our MoELayer / PEERLayer objects get a subclass that also derives from it (`_mark_moe_layers`).

Loss scaling: our micro-step loss is CE_sum / global tokens (+ aux terms / global micro
batches), and its gradients must be SUMMED over dp (dense) and edp (experts). DeepSpeed divides
every reduced gradient (dense and expert alike: ZeRO's average_tensor and stage 0's
_reduce_expert_gradients both use the dp world size) by dp, and engine.backward divides the
loss by gradient_accumulation_steps. So backward gets `loss * dp` with scale_wrt_gas=False:
the resulting gradients equal the native engine's.

Clipping: ZeRO 1/2 compute the global norm correctly with experts (the partition norms are
summed over the whole dp group, so every expert of every EP rank counts once): DeepSpeed clips
(`gradient_clipping`). Stage 0's clip averages per-rank norms that differ across EP ranks, so at
stage 0 DeepSpeed's clipping is off and the native global-norm clip (parallel/grads.py) runs on
the reduced gradients before engine.step().

Precision: DeepSpeed's bf16 mode is off; the model, its gradients (accumulation and reduction)
and the optimizer stay fp32 and compute runs under the trainer's bf16 autocast on CUDA (see
ds_config). Tested with deepspeed 0.19.8 (config validation requires 0.19.x, >= 0.19.8).

Checkpointing is not supported with this engine (config validation refuses checkpoint.every > 0
and checkpoint.resume != none).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.config import Config, micro_batch
from moetrain.moe.layer import MoELayer
from moetrain.moe.peer import PEERLayer
from moetrain.parallel.grads import clip_grad_norm
from moetrain.parallel.mesh import Parallel, process_group_backend
from moetrain.parallel.rendezvous import free_port
from moetrain.train.optim import decay_groups


def import_deepspeed(device: torch.device):
    """DeepSpeed picks its accelerator at import: on CPU it must be told (DS_ACCELERATOR=cpu)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    _skip_shm_op()
    if get_accelerator().device_name() != device.type:
        raise RuntimeError(f"deepspeed was imported with the {get_accelerator().device_name()!r} accelerator but "
                           f"training runs on {device.type}: set DS_ACCELERATOR={device.type}")
    return deepspeed


def _skip_shm_op() -> None:
    """DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op for CPU
    inference (deepspeed_shm_comm, ~2 minutes of g++ on a 2-core box, and a compiler needed) the
    first time it starts. Training never uses it: mark it unavailable in DeepSpeed's probe of
    compatible ops (a cached dict meant to be edited) before the backend is created."""
    try:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.ops
        if getattr(ds_comm, "cdb", None) is None:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (dp * micro_batch(cfg, dp))


DS_BUCKET = 500_000_000      # DeepSpeed's default reduce/allgather bucket (elements)


def ds_config(cfg: Config, dp: int, device: torch.device, bucket_elements: int = DS_BUCKET) -> dict:
    """The DeepSpeed config for our train.* keys (validate_layout already checked the batch).
    bucket_elements: ZeRO's reduce/allgather bucket size; DeepSpeed allocates a buffer this large,
    so the engine passes min(default, this rank's parameter count)."""
    t = cfg.train
    stage = t.zero_stage
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg, dp),
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, dp),
        # torch's AdamW (no compiled DeepSpeed op), per-tensor math like optim.build_optimizer's;
        # lr is overwritten every step from train/lr.py; param groups carry the weight decay
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
            "torch_adam": True, "foreach": False}},
        "gradient_clipping": float(t.grad_clip) if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_scatter": True, "reduce_bucket_size": int(bucket_elements),
                              "allgather_bucket_size": int(bucket_elements)},
        # DeepSpeed's bf16 mode would make the model bf16 and accumulate and reduce the gradients
        # in bf16 (its stage-0 path refuses fp32 accumulation with bf16 weights). Instead the model
        # stays fp32 inside DeepSpeed (fp32 weights, gradients, reductions and optimizer) and the
        # trainer's bf16 autocast runs the matmuls in bf16, exactly as with the native engine.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "prescale_gradients": False,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def optimizer_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """optim.build_optimizer's groups (decay on matrices only), experts split off into
    DeepSpeed's MoE groups; empty groups dropped."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    groups = [dict(g, name=name) for g, name in zip(decay_groups(model, cfg.train.weight_decay), ("decay", "no_decay"))]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]




def register_groups(par: Parallel, backend: str = "auto") -> str:
    """Hand DeepSpeed our groups (see the module docstring). World 1 has none: a one-process
    group is started here, as DeepSpeed needs torch.distributed."""
    from deepspeed.utils import groups
    name = expert_group_name(par.dims.ep)
    if par.world == 1:
        if not dist.is_initialized():
            backend = process_group_backend(backend, par.device)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    device_id=par.device if backend == "nccl" else None)
        world = dist.new_group([0])
        ep_group, edp_group, dp_group = world, world, world
        ep_ranks, edp_ranks = [0], [0]
    else:
        d = par.dims
        edp_idx, ep_idx = par.edp_rank, par.ep_rank
        ep_group, edp_group, dp_group = par.ep_group, par.edp_group, par.dp_group
        ep_ranks = [edp_idx * d.ep + i for i in range(d.ep)]          # tp == 1: rank == dp rank
        edp_ranks = [j * d.ep + ep_idx for j in range(d.edp)]
    # overwritten on every build: a process may build several engines on several meshes
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    if hasattr(groups, "_EXPERT_PARALLEL_GROUP_RANKS"):
        groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    groups._WORLD_GROUP = dp_group         # tp == 1: the data-parallel group is every rank
    return name


def _mark_moe_layers(model: nn.Module) -> None:
    """Make DeepSpeed count our MoE layers (engine.has_moe_layers) without changing them."""
    from deepspeed.moe.layer import MoE

    for mod in model.modules():
        if isinstance(mod, (MoELayer, PEERLayer)) and not isinstance(mod, MoE):
            mod.__class__ = _deepspeed_moe_class(type(mod), MoE)


_MOE_CLASSES: dict = {}


def _deepspeed_moe_class(ours: type, ds_moe: type) -> type:
    if ours not in _MOE_CLASSES:
        def set_deepspeed_parallelism(self, *args, **kwargs):
            """Our layer already routes over our EP group; nothing to create."""

        _MOE_CLASSES[ours] = type(f"DeepSpeed{ours.__name__}", (ours, ds_moe),
                                  {"set_deepspeed_parallelism": set_deepspeed_parallelism,
                                   "__module__": __name__})
    return _MOE_CLASSES[ours]


class DeepSpeedEngine:
    """The Trainer's engine adapter: forward(inp), backward(loss) per micro batch, step() -> grad norm."""

    def __init__(self, cfg: Config, par: Parallel, model: nn.Module, expert_params: list):
        deepspeed = import_deepspeed(par.device)
        self.cfg, self.par = cfg, par
        self.stage = cfg.train.zero_stage
        self.gas = gradient_accumulation_steps(cfg, par.dims.dp)
        name = register_groups(par, cfg.parallel.backend)
        # DeepSpeed insists on LOCAL_RANK (srun/mpiexec set their own variables): it only picks
        # the device with it, which is already chosen (parallel/mesh.pick_device)
        os.environ.setdefault("LOCAL_RANK", str(par.device.index or 0) if par.device.type == "cuda" else "0")
        for p in expert_params:
            p.allreduce = False
            p.group_name = name
        self.expert_ids = {id(p) for p in expert_params}
        _mark_moe_layers(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=optimizer_groups(model, cfg),
            config=ds_config(cfg, par.dims.dp, par.device, min(DS_BUCKET, sum(p.numel() for p in model.parameters()))),
            dist_init_required=False)
        if expert_params and not getattr(self.engine, "has_moe_layers", False):
            raise RuntimeError("DeepSpeed did not register the MoE layers: expert gradients would be averaged "
                               "over the data-parallel group")
        # DeepSpeed averages over dp what our loss scaling needs summed (see the module docstring)
        self.loss_scale = float(par.dims.dp)
        self._micro = 0

    def forward(self, inp: torch.Tensor):
        return self.engine(inp)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_scale, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.gas:
            self.engine.step()           # not a boundary: DeepSpeed only advances its micro-step count

    def step(self) -> float:
        """At the accumulation boundary: (stage 0: our global-norm clip), optimizer step, zero grads.
        Returns the gradient norm before clipping."""
        assert self._micro == self.gas, (self._micro, self.gas)
        self._micro = 0
        norm = None
        if self.stage == 0:
            model = self.engine.module
            dense = [p for p in model.parameters() if p.requires_grad and id(p) not in self.expert_ids]
            expert = [p for p in model.parameters() if id(p) in self.expert_ids]
            norm = clip_grad_norm(dense, expert, self.cfg.train.grad_clip, self.par.ep_group, self.par.dims.ep)
        before = self.engine.global_steps
        self.engine.step()
        if self.engine.global_steps != before + 1:
            raise RuntimeError("DeepSpeed skipped the optimizer step (accumulation boundary out of sync)")
        if norm is None:
            got = self.engine.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
        return norm
