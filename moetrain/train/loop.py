"""The training loop: one optimizer step = the global batch, split over dp ranks and micro-steps.

Loss scaling that makes every layout compute the same gradients as world size 1:
    micro-step loss = CE_sum / tokens_in_global_batch
                    + (aux_coef * sum_layers aux + z_coef * sum_layers z) / micro_batches_in_global_batch
Gradients are then SUMMED over dp (dense) and edp (experts). The balance loss of a micro batch is
computed over the same sequences whatever the layout, because the global batch is cut into
contiguous rank slices and then contiguous micro batches. Under tensor parallelism every TP rank
computes the same CE_sum (vocab-parallel cross-entropy) and differentiates one copy of it.
The sums are our all-reduce (parallel/grads.py), FSDP's reduce-scatter under parallel.fsdp
(parallel/fsdp.py), or DeepSpeed's averaging undone by scaling the loss (train/ds_engine.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moetrain.checkpoint import Checkpointer
from moetrain.config import Config, micro_batch, to_yaml
from moetrain.data import TokenData, eval_batches, sample_batch
from moetrain.metrics import GpuStats, RunWriter, StepStats, gather_stats, summarize
from moetrain.model.transformer import Transformer, count_params
from moetrain.moe.experts import choose_impl
from moetrain.parallel.apply import apply_ep, apply_routing_groups, split_params
from moetrain.parallel.fsdp import apply_fsdp, fsdp_dtypes
from moetrain.parallel.grads import GradientSync, clip_grad_norm
from moetrain.parallel.mesh import Parallel
from moetrain.parallel.tp import apply_tp, cross_entropy_sum
from moetrain.precision import uses_bf16_autocast
from moetrain.train.lr import lr_at
from moetrain.train.optim import build_optimizer, set_lr
from moetrain.train.preempt import Preempted, PreemptionWatch, configured_signals, signal_name  # noqa: F401


class TrainingDiverged(RuntimeError):
    """A non-finite gradient norm: one line, raised on every rank before the optimizer step."""


@dataclass
class TrainState:
    step: int = 0             # optimizer steps completed
    tokens_seen: int = 0


@dataclass
class Trainer:
    cfg: Config
    par: Parallel
    data: TokenData
    model: Transformer
    opt: torch.optim.Optimizer
    dense_params: list
    expert_params: list
    state: TrainState
    # train.engine=deepspeed: forward/backward/step go through train/ds_engine.DeepSpeedEngine
    engine: Any = None
    # native engine: the gradient all-reduce over dp/edp (None when DeepSpeed reduces)
    grad_sync: Optional[GradientSync] = None
    # run_training's preemption watch (train/preempt.py): its per-step agreement rides on the step
    preempt: Optional[PreemptionWatch] = None

    @property
    def local_batch(self) -> int:
        return self.cfg.train.global_batch_size // self.par.dims.dp

    @property
    def micro(self) -> int:
        return micro_batch(self.cfg, self.par.dims.dp)

    @property
    def micro_batches_global(self) -> int:
        return self.cfg.train.global_batch_size // self.micro

    def autocast(self):
        if uses_bf16_autocast(self.cfg.train.precision, self.par.device):
            return torch.autocast(self.par.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This dp rank's contiguous slice of the global batch (TP ranks share one slice)."""
        lo = self.par.dp_rank * self.local_batch
        return batch[lo:lo + self.local_batch]

    def forward_loss(self, rows: torch.Tensor):
        """CE summed over tokens (fp32) and the per-layer aux results of one micro batch."""
        if rows.device != self.par.device:
            if self.par.device.type == "cuda":
                rows = rows.pin_memory()   # pinned host memory: the copy does not block the host
            rows = rows.to(self.par.device, non_blocking=True)
        inp, tgt = rows[:, :-1], rows[:, 1:]
        with self.autocast():
            logits, auxes = (self.model if self.engine is None else self.engine.forward)(inp)
        # under TP the logits are this rank's vocab shard and the sum is the same on every TP rank
        ce_sum = cross_entropy_sum(logits, tgt, self.par)
        return ce_sum, auxes

    def compute_gradients(self, step: int, stats: Optional[StepStats] = None) -> torch.Tensor:
        """Forward/backward over this rank's micro batches of global batch `step`, then sync the
        gradients over the mesh. Returns local sums [ce_sum, aux_mean_sum, z_mean_sum]."""
        t, m = self.cfg.train, self.cfg.moe
        self.model.train()
        rows = self.local_rows(sample_batch(self.data.train, t.seed, step, t.global_batch_size, t.seq_len))
        global_tokens = t.global_batch_size * t.seq_len
        dev = self.par.device
        # running sums stay on the device: reading them would be a host sync every micro-step
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
        load = torch.zeros(len(self.model.moe_layers()), self.cfg.num_router_outputs, device=dev)
        self._step_load = load
        for lo in range(0, rows.shape[0], self.micro):
            if lo + self.micro >= rows.shape[0] and self.grad_sync is not None:
                self.grad_sync.arm()     # the last micro-step: reduce gradients as they become final
            ce_sum, auxes = self.forward_loss(rows[lo:lo + self.micro])
            loss = ce_sum / global_tokens
            if auxes:
                aux = torch.stack([a.aux_loss for a in auxes]).sum()
                z = torch.stack([a.z_loss for a in auxes]).sum()
                loss = loss + (m.aux_loss_coef * aux + m.z_loss_coef * z) / self.micro_batches_global
                sums[1] += aux.detach() / len(auxes)
                sums[2] += z.detach() / len(auxes)
            if self.engine is None:
                loss.backward()
            else:
                self.engine.backward(loss)
            sums[0] += ce_sum.detach()
            if stats is not None:
                stats.add(auxes)
            if self.bias_gates:
                load += torch.stack([a.counts_E for a in auxes]).to(load)
        if self.grad_sync is not None:     # (FSDP-managed params were reduce-scattered in backward)
            with record_function("train/grad_sync"):
                self.grad_sync.finish()
        return sums

    def train_step(self, step: int, stats: Optional[StepStats] = None) -> torch.Tensor:
        """One optimizer step. Returns [ce_sum, aux_sum, z_sum, grad_norm] (ce not reduced over dp)."""
        t = self.cfg.train
        if self.preempt is not None:
            self.preempt.launch()            # async: the tiny all-reduce overlaps forward/backward
        set_lr(self.opt, lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio))
        sums = self.compute_gradients(step, stats)
        if self.engine is not None:
            norm = self.engine.step()        # DeepSpeed reduces, clips and steps
            if self.preempt is not None:
                self.preempt.resolve()
        else:
            # the one host sync of an optimizer step: the norm decides whether the step is taken
            with record_function("train/clip"):
                norm = clip_grad_norm(self.dense_params, self.expert_params, t.grad_clip, self.par.ep_group,
                                      self.par.dims.ep, self.par.tp_group, self.par.dims.tp)
            if not math.isfinite(norm):      # the same global value on every rank: all stop alike
                raise TrainingDiverged(
                    f"step {step + 1}: the gradient norm is {norm} (the loss became non-finite); the weights "
                    "were not updated. Lower train.lr, raise train.warmup_steps or set train.grad_clip")
            if self.preempt is not None:
                # right after the norm read: the stream is drained, so this 4-byte read adds no stall
                self.preempt.resolve()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.bias_gates:
            self.update_router_biases(self._step_load)
        self.state.step = step + 1
        self.state.tokens_seen += t.global_batch_size * t.seq_len
        return torch.cat([sums, sums.new_full((1,), float(norm))])     # a fill, not a blocking copy

    @property
    def bias_gates(self) -> list:
        return [layer.router for layer in self.model.moe_layers() if layer.router.kind == "aux_free"]

    def update_router_biases(self, load_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3), as an optimizer-step hook: every rank applies
        the same update from the global batch's expert load, so biases never diverge."""
        load_LE = self.reduce_dp(load_LE)
        layers = self.model.moe_layers()
        for i, layer in enumerate(layers):
            layer.router.update_bias(load_LE[i])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean CE (nats/token) over fixed validation windows, identical for every layout."""
        t = self.cfg.train
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.par.device)
        for batch in eval_batches(self.data.val, t.eval_batches, t.global_batch_size, t.seq_len):
            rows = self.local_rows(batch)
            for lo in range(0, rows.shape[0], self.micro):
                ce_sum, _ = self.forward_loss(rows[lo:lo + self.micro])
                total[0] += ce_sum.detach()
                total[1] += rows[lo:lo + self.micro, 1:].numel()
        total = self.reduce_dp(total).cpu()
        self.model.train()
        return float(total[0] / total[1])

    def reduce_dp(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group, on the training device (NCCL takes no host tensor)."""
        if self.par.dims.dp == 1:
            return x
        x = x.to(self.par.device, copy=True)
        dist.all_reduce(x, group=self.par.dp_group)
        return x


def seed_rank_rngs(seed: int, rank: int, device: torch.device) -> None:
    """Per-rank streams for everything random at run time (GShard's uniform draws, noisy top-k
    noise, router jitter). Weights never use these: init_weights has its own keyed generators."""
    import random

    import numpy as np
    s = (seed * 1_000_003 + 7919 * rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.manual_seed(s)


def build_trainer(cfg: Config, par: Parallel, data: TokenData) -> Trainer:
    model = Transformer(cfg)
    apply_ep(model, par)
    apply_routing_groups(model, par)
    model.init_weights(cfg.train.seed)
    apply_tp(model, par, cfg.parallel.etp)     # after init: TP shards are slices of the full weights
    model.to(par.device)
    if cfg.parallel.fsdp:                      # parallel/fsdp.py; before the optimizer sees the params
        p = cfg.parallel
        bf16 = uses_bf16_autocast(cfg.train.precision, par.device)
        apply_fsdp(model, par, *fsdp_dtypes(p.fsdp_param_dtype, p.fsdp_reduce_dtype, bf16))
    # TP ranks replicate routing (GShard draws, router noise): they share one RNG stream per dp rank
    seed_rank_rngs(cfg.train.seed, par.dp_rank, par.device)
    dense, expert = split_params(model)
    if cfg.train.engine == "deepspeed":
        from moetrain.train.ds_engine import DeepSpeedEngine
        engine = DeepSpeedEngine(cfg, par, model, expert)
        return Trainer(cfg, par, data, model, engine.optimizer, dense, expert, TrainState(), engine)
    opt = build_optimizer(model, cfg.train)
    grad_sync = GradientSync(dense, expert, par, cfg.parallel.grad_bucket_mb)
    return Trainer(cfg, par, data, model, opt, dense, expert, TrainState(), grad_sync=grad_sync)


def _open_run_dir(cfg: Config, start_step: int) -> str:
    """Create the run directory. A fresh run (step 0) moves an older metrics.jsonl aside instead
    of appending to it; a resumed run keeps the records up to its checkpoint's step and drops the
    later ones, which the crashed attempt logged and this run logs again."""
    run_dir = os.path.join(cfg.logging.dir, cfg.logging.run_name)
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics) and start_step == 0:
        n = 1
        while os.path.exists(os.path.join(run_dir, f"metrics.{n}.jsonl")):
            n += 1
        os.replace(metrics, os.path.join(run_dir, f"metrics.{n}.jsonl"))
    elif os.path.exists(metrics):
        _truncate_metrics(metrics, start_step)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return run_dir


def _truncate_metrics(path: str, last_step: int) -> None:
    keep = []
    with open(path, errors="replace") as f:       # bytes a crash garbled must not stop the resume
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:      # a line cut by the crash
                continue
            step = rec.get("step", 0) if isinstance(rec, dict) else None     # [1], "text": not ours
            if isinstance(step, int) and step <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def run_training(cfg: Config, par: Parallel, data: TokenData, log=print) -> dict:
    """Train cfg.train.steps steps. Returns the last logged record (rank 0) or {}.
    Raises Preempted (every rank alike) when an exit signal stopped it (train/preempt.py)."""
    # exit signals are recorded from here on (a signal during start-up stops after the first step)
    watch = PreemptionWatch(configured_signals(cfg), par)
    watch.install()
    ckpt = Checkpointer(cfg, par, log)
    try:
        return _run_training(cfg, par, data, log, watch, ckpt)
    finally:
        ckpt.close()              # checkpoint.dir's lock (rank 0) is released on every way out
        watch.restore()


def _run_training(cfg: Config, par: Parallel, data: TokenData, log, watch: PreemptionWatch,
                  ckpt: Checkpointer) -> dict:
    t, lg = cfg.train, cfg.logging
    trainer = build_trainer(cfg, par, data)
    trainer.preempt = watch if watch.enabled else None
    ckpt.resume(trainer)          # checkpoint.resume: sets trainer.state.step, model, optimizer, RNG
    total_params, active_params = count_params(trainer.model, cfg)
    writer = RunWriter(_open_run_dir(cfg, trainer.state.step), lg.tensorboard) if par.is_main else None
    gpu = GpuStats(par.device)
    if par.is_main:
        log(f"moetrain: world {par.world} (dp {par.dims.dp}, tp {par.dims.tp}, ep {par.dims.ep}) on "
            f"{par.device}; {total_params / 1e6:.2f}M params, {active_params / 1e6:.2f}M active; data {data.source}"
            f"{_expert_impl_note(cfg, par)}{_numerics_note(cfg, par)}")
        if gpu.reason:
            log(f"moetrain: {gpu.reason}")
    num_layers = len(trainer.model.moe_layers())
    progress = _progress(par.is_main and t.progress, t.steps, trainer.state.step)
    last: dict = {}
    window_s, window_tokens = 0.0, 0
    for step in range(trainer.state.step, t.steps):
        if watch.agreed:          # every rank agreed during the previous step (train_step)
            break
        ckpt.on_step(trainer)     # saves when step % checkpoint.every == 0 (previous step fully logged)
        watch.maybe_test_signal(step, par.rank)
        logged = (step + 1) % lg.every == 0 or step + 1 == t.steps or step == 0
        stats = StepStats(num_layers, cfg.num_router_outputs, par.device) if logged else None
        init_val = None
        if step == 0 and t.eval_every > 0:
            # every metrics.jsonl record is a training step's (DESIGN): the loss before training
            # rides on step 1's record as init_val_loss, and on TensorBoard's val_loss at step 0
            init_val = trainer.evaluate()
            if writer is not None:
                writer.write_tensorboard({"step": 0, "val_loss": init_val})
                log(f"step 0 val_loss {init_val:.4f}")
        step_start = time.perf_counter()
        sums = trainer.train_step(step, stats)
        if logged and par.device.type == "cuda":
            torch.cuda.synchronize(par.device)
        step_ms = (time.perf_counter() - step_start) * 1e3
        window_s += step_ms / 1e3
        window_tokens += t.global_batch_size * t.seq_len
        evaluate = (t.eval_every > 0 and (step + 1) % t.eval_every == 0) or step + 1 == t.steps
        val_loss = trainer.evaluate() if evaluate else None
        if progress is not None:
            progress.update(1)
        if not logged:
            continue
        reduced = trainer.reduce_dp(sums[:3]).cpu()
        rows = gather_stats(stats, step_ms, par.world_group, par.world)
        if writer is not None:
            rec = {"step": step + 1, "loss": float(reduced[0]) / (t.global_batch_size * t.seq_len),
                   "lr": trainer.opt.param_groups[0]["lr"],
                   "tokens_per_s": window_tokens / max(1e-9, window_s),
                   "aux_loss": float(reduced[1]) / max(1, trainer.micro_batches_global),
                   "z_loss": float(reduced[2]) / max(1, trainer.micro_batches_global),
                   "grad_norm": float(sums[3]), "tokens": trainer.state.tokens_seen, "step_ms": step_ms}
            if val_loss is not None:
                rec["val_loss"] = val_loss
            if init_val is not None:
                rec["init_val_loss"] = init_val
            rec.update(summarize(rows, num_layers, cfg.num_router_outputs, par.dims.tp))
            rec.update(gpu.read())
            writer.write(rec)
            last = rec
            msg = (f"step {step + 1} loss {rec['loss']:.4f} lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f} "
                   f"drop {rec['drop_frac']:.3f} a2a {rec['a2a_ms']:.1f}ms")
            if val_loss is not None:
                msg += f" val_loss {val_loss:.4f}"
            (progress.write if progress is not None else log)(msg)
            if progress is not None:
                progress.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        window_s, window_tokens = 0.0, 0
    if watch.agreed and trainer.state.step < t.steps:
        _stop_preempted(trainer, ckpt, watch, progress, writer, log)
    if watch.agreed and par.is_main:   # during the last step: the run is complete, exit normally
        log(f"moetrain: {signal_name(watch.agreed)} during the last step: finishing normally")
    ckpt.finish(trainer)          # final save when checkpointing is on; waits for an async write
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    return last


def _stop_preempted(trainer: Trainer, ckpt: Checkpointer, watch: PreemptionWatch, progress, writer, log) -> None:
    """Every rank: save (when checkpointing is on) and wait for the commit, rank 0 logs one line,
    then raise Preempted everywhere. The step in progress has finished and been logged."""
    from moetrain.checkpoint.store import step_dirname
    step, name = trainer.state.step, signal_name(watch.agreed)
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    if ckpt.enabled:
        ckpt.finish(trainer)      # saves unless this step's checkpoint exists; waits for the commit
        path = os.path.join(ckpt.root, step_dirname(step))
        msg = (f"preempted by {name} at step {step}: checkpoint {step_dirname(step)} saved in {ckpt.root}; "
               "resume with checkpoint.resume=auto")
    else:
        ckpt.wait()
        path = None
        msg = (f"preempted by {name} at step {step}: checkpointing is off (checkpoint.every=0), nothing was "
               "saved; set checkpoint.every to make a preemption resumable")
    if trainer.par.is_main:
        log(f"moetrain: {msg}")
    watch.sync()                  # nobody exits (srun -K would kill the rest) before rank 0 logged
    raise Preempted(msg, watch.agreed, step, path)


def _expert_impl_note(cfg: Config, par: Parallel) -> str:
    """'; experts: <impl> (<why>)' for the run's first line ('' without routed FFN experts)."""
    if cfg.moe.num_experts == 0 or cfg.moe.layer != "moe":
        return ""
    hidden = cfg.expert_hidden // (par.dims.tp if cfg.parallel.etp else 1)
    dtype = torch.bfloat16 if uses_bf16_autocast(cfg.train.precision, par.device) else torch.float32
    impl, why = choose_impl(cfg.moe.grouped_mm, par.device, dtype, cfg.model.dim, hidden)
    return f"; experts: {impl} ({why})"


def _numerics_note(cfg: Config, par: Parallel) -> str:
    parts = []
    if uses_bf16_autocast(cfg.train.precision, par.device):
        parts.append("bf16 autocast")
    elif par.device.type == "cuda":
        parts.append("fp32")
    if par.world > 1:
        parts.append(f"backend {dist.get_backend(par.world_group)}")
    if cfg.train.deterministic:
        parts.append("deterministic")
    return "; " + ", ".join(parts) if parts else ""


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0)
