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

Entry points: run_training (the CLI) = build_run -> Run.steps -> Run.finish, closed on every way
out; build_trainer -> Trainer.train_step for tools that want the step without a run around it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moetrain.checkpoint import Checkpointer
from moetrain.config import Config, micro_batch
from moetrain.data import TokenData, eval_batches, sample_batch
from moetrain.metrics import GpuStats, RunWriter, StepStats, summarize
from moetrain.model.tp_plan import apply_tp
from moetrain.model.transformer import Transformer
from moetrain.parallel.apply import apply_ep, apply_routing_groups, sparse_grad_params, split_params
from moetrain.parallel.fsdp import apply_fsdp, fsdp_dtypes
from moetrain.parallel.grads import GradientSync, clip_grad_norm
from moetrain.parallel.mesh import Parallel
from moetrain.parallel.replicas import ExpertPlacer, Replacement
from moetrain.parallel.tp import cross_entropy_sum
from moetrain.precision import uses_bf16_autocast
from moetrain.train.lr import lr_at
from moetrain.train.optim import build_optimizer, set_lr
from moetrain.train.outputs import first_line, open_run_dir, progress_bar
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
    # the Run's preemption watch (train/preempt.py): its per-step agreement rides on the step
    preempt: Optional[PreemptionWatch] = None
    # moe.placement=balanced (parallel/replicas.py): the expert placement, its replica gradient
    # sum and its re-placements; replaced: what the last step's re-placement did (None: none)
    placer: Optional[ExpertPlacer] = None
    replaced: Optional[Replacement] = None

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
        ce_sum = cross_entropy_sum(logits, tgt)
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
            with record_function("train/forward"):
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
            if self.placer is not None and auxes:
                self.placer.add_load(torch.stack([a.kept_E for a in auxes]))
        if self.grad_sync is not None:     # (FSDP-managed params were reduce-scattered in backward)
            with record_function("train/grad_sync"):
                self.grad_sync.finish()
        if self.placer is not None:        # after the dp/edp sum: replicas of an expert add up
            with record_function("train/replica_sync"):
                self.placer.sync_grads()
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
                                      self.par.dims.ep,
                                      self.placer.primary_rows() if self.placer is not None else None)
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
        if self.placer is not None:        # at the step boundary: weights and moments may move
            with record_function("train/replace_experts"):
                self.replaced = self.placer.rebalance(step + 1, self.opt)
        self.state.step = step + 1
        self.state.tokens_seen += t.global_batch_size * t.seq_len
        return torch.cat([sums, sums.new_full((1,), float(norm))])     # a fill, not a blocking copy

    @property
    def bias_gates(self) -> list:
        return [layer.router for layer in self.model.moe_layers() if layer.router.spec.bias_state]

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
    placer = apply_ep(model, par, cfg.moe)
    apply_routing_groups(model, par)
    model.init_weights(cfg.train.seed)
    apply_tp(model, par.tp_mesh, cfg.parallel.etp)     # after init: TP shards are slices of the full weights
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
    opt = build_optimizer(model, cfg.train, lazy=cfg.moe.peer.sparse_updates)
    grad_sync = GradientSync(dense, expert, par, cfg.parallel.grad_bucket_mb, sparse=sparse_grad_params(model))
    return Trainer(cfg, par, data, model, opt, dense, expert, TrainState(), grad_sync=grad_sync, placer=placer)


@dataclass
class Run:
    """One training run, for the CLI, tools and tests: run = build_run(...); run.steps();
    run.finish(); run.close() on every way out (`with build_run(...) as run:` closes it)."""
    trainer: Optional[Trainer]          # None only while build_run builds it
    ckpt: Checkpointer
    watch: PreemptionWatch              # exit signals (train/preempt.py)
    log: Callable[[str], None] = print
    writer: Optional[RunWriter] = None  # rank 0: metrics.jsonl and tb/
    gpu: Optional[GpuStats] = None
    progress: Any = None                # rank 0's tqdm bar (train.progress)
    last: dict = field(default_factory=dict)    # the last logged record (rank 0; {} elsewhere)
    window_s: float = 0.0               # step time and tokens since the last logged step
    window_tokens: int = 0
    snapshots: Any = None               # checkpoint.snapshot_every > 0: checkpoint/snapshot.Snapshots
    snapshot_step: int = 0              # the step of the last snapshot taken or resumed from
    snapshot_held: bool = False         # one exists: taken by this run or resumed from

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> dict:
        """The steps from trainer.state.step to train.steps. Returns the last logged record (rank
        0) or {}. Raises Preempted (every rank alike, after saving) when an exit signal stopped it."""
        trainer, watch = self.trainer, self.watch
        for step in range(trainer.state.step, trainer.cfg.train.steps):
            if watch.agreed:          # every rank agreed during the previous step (train_step)
                break
            self.step(step)
        if watch.agreed and trainer.state.step < trainer.cfg.train.steps:
            self._stop_preempted()
        if watch.agreed and trainer.par.is_main:   # during the last step: the run is complete, exit normally
            self.log(f"moetrain: {signal_name(watch.agreed)} during the last step: finishing normally")
        return self.last

    def finish(self) -> None:
        """After the last step: the final save when checkpointing is on; waits for an async write."""
        self.ckpt.finish(self.trainer)
        snaps, step = self.snapshots, self.trainer.state.step
        if snaps is not None and self.ckpt.enabled:     # the final disk checkpoint holds it all
            snaps.remove()
        elif snaps is not None and snaps.due(step) and step > self.snapshot_step:
            snaps.save(self.trainer)                   # no disk checkpoints: the last step's state too
        self._close_outputs()

    def close(self) -> None:
        """Every way out: the outputs closed, checkpoint.dir's lock (rank 0) released, the signal
        handlers restored."""
        self._close_outputs()
        self.ckpt.close()
        self.watch.restore()

    def _close_outputs(self) -> None:
        for out in (self.progress, self.writer):
            if out is not None:
                out.close()
        self.progress = self.writer = None

    def step(self, step: int) -> None:
        """Optimizer step `step` (0-based) with its checkpoint, evaluations and logging."""
        trainer, par = self.trainer, self.trainer.par
        t, lg = trainer.cfg.train, trainer.cfg.logging
        self.ckpt.on_step(trainer)    # saves when step % checkpoint.every == 0 (previous step fully logged)
        # in-memory snapshot of the state after the previous step, also once that step is logged (a
        # snapshot taken before its step's record was written would resume past an unlogged step)
        snapshot = self.snapshots is not None and self.snapshots.due(step) and step > self.snapshot_step
        if snapshot:
            self.snapshot_held = self.snapshots.save(trainer) or self.snapshot_held
            self.snapshot_step = step
        logged = (step + 1) % lg.every == 0 or step + 1 == t.steps or step == 0 or (
            trainer.placer is not None and trainer.placer.due(step + 1))     # a re-placement is always logged
        num_layers = len(trainer.model.moe_layers())
        stats = StepStats(num_layers, trainer.cfg.num_router_outputs, par.device) if logged else None
        init_val = None
        if step == 0 and t.eval_every > 0:
            # every metrics.jsonl record is a training step's (DESIGN): the loss before training
            # rides on step 1's record as init_val_loss, and on TensorBoard's val_loss at step 0
            init_val = trainer.evaluate()
            if self.writer is not None:
                self.writer.write_tensorboard({"step": 0, "val_loss": init_val})
                self.log(f"step 0 val_loss {init_val:.4f}")
        step_start = time.perf_counter()
        sums = trainer.train_step(step, stats)
        if logged and par.device.type == "cuda":
            torch.cuda.synchronize(par.device)
        step_ms = (time.perf_counter() - step_start) * 1e3
        self.window_s += step_ms / 1e3
        self.window_tokens += t.global_batch_size * t.seq_len
        evaluate = (t.eval_every > 0 and (step + 1) % t.eval_every == 0) or step + 1 == t.steps
        val_loss = trainer.evaluate() if evaluate else None
        if self.progress is not None:
            self.progress.update(1)
        if logged:
            extra = {"snapshot_ms": round(self.snapshots.last_ms, 2),
                     "snapshot_mb": round(self.snapshots.last_bytes / 2 ** 20, 3)} if snapshot else {}
            self._log_step(step, sums, stats, step_ms, val_loss, init_val, extra)
            self.window_s, self.window_tokens = 0.0, 0

    def _log_step(self, step: int, sums: torch.Tensor, stats: StepStats, step_ms: float, val_loss, init_val,
                  extra: Optional[dict] = None) -> None:
        """Every rank joins the dp reduction and the one all_gather of the step's statistics; rank
        0 writes the record and prints its line."""
        trainer, par, t = self.trainer, self.trainer.par, self.trainer.cfg.train
        reduced = trainer.reduce_dp(sums[:3]).cpu()
        rows = stats.record(step_ms).gather(par.world_group, par.world)
        if self.writer is None:
            return
        micro = max(1, trainer.micro_batches_global)
        rec = {"step": step + 1, "loss": float(reduced[0]) / (t.global_batch_size * t.seq_len),
               "lr": trainer.opt.param_groups[0]["lr"], "tokens_per_s": self.window_tokens / max(1e-9, self.window_s),
               "aux_loss": float(reduced[1]) / micro, "z_loss": float(reduced[2]) / micro, "grad_norm": float(sums[3]),
               "tokens": trainer.state.tokens_seen, "step_ms": step_ms}
        if val_loss is not None:
            rec["val_loss"] = val_loss
        if init_val is not None:
            rec["init_val_loss"] = init_val
        rec.update(summarize(rows, par.dims.tp))
        if trainer.replaced is not None:
            rec.update(trainer.replaced.metrics())
        rec.update(extra or {})
        rec.update(self.gpu.read())
        self.writer.write(rec)
        self.last = rec
        msg = (f"step {step + 1} loss {rec['loss']:.4f} lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f} "
               f"drop {rec['drop_frac']:.3f} a2a {rec['a2a_ms']:.1f}ms")
        if val_loss is not None:
            msg += f" val_loss {val_loss:.4f}"
        if trainer.replaced is not None:
            r = trainer.replaced
            msg += (f" | experts re-placed in {sum(r.moved)}/{len(r.moved)} layers ({r.ms:.0f} ms): imbalance "
                    + " ".join(f"{b:.2f}->{a:.2f}" for b, a in zip(r.before, r.after)))
        (self.progress.write if self.progress is not None else self.log)(msg)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    def _stop_preempted(self) -> None:
        """Every rank: save (when checkpointing is on) and wait for the commit, rank 0 logs one
        line, then raise Preempted everywhere. The step in progress has finished and been logged."""
        from moetrain.checkpoint.store import step_dirname
        trainer, ckpt, watch = self.trainer, self.ckpt, self.watch
        step, name = trainer.state.step, signal_name(watch.agreed)
        self._close_outputs()
        if ckpt.enabled:
            ckpt.finish(trainer)      # saves unless this step's checkpoint exists; waits for the commit
            path = os.path.join(ckpt.root, step_dirname(step))
            msg = (f"preempted by {name} at step {step}: checkpoint {step_dirname(step)} saved in {ckpt.root}; "
                   "resume with checkpoint.resume=auto")
        elif self.snapshots is not None and self.snapshots.every > 0:
            # an elastic agent stops the workers with SIGTERM when a node joins: the state of this
            # step then lives on in host memory (and its peer replica) for the regrown group
            ckpt.wait()
            if step > self.snapshot_step and self.snapshots.save(trainer):
                self.snapshot_step, self.snapshot_held = step, True
            path = None
            msg = (f"preempted by {name} at step {step}: checkpointing is off (checkpoint.every=0); " + (
                f"the in-memory snapshot of step {self.snapshot_step} resumes it under checkpoint.resume=auto while "
                "this job's nodes keep their snapshot_dir" if self.snapshot_held else
                "no in-memory snapshot could be taken, nothing was saved"))
        else:
            ckpt.wait()
            path = None
            msg = (f"preempted by {name} at step {step}: checkpointing is off (checkpoint.every=0), nothing was "
                   "saved; set checkpoint.every to make a preemption resumable")
        if trainer.par.is_main:
            self.log(f"moetrain: {msg}")
        watch.sync()                  # nobody exits (srun -K would kill the rest) before rank 0 logged
        raise Preempted(msg, watch.agreed, step, path)


def run_training(cfg: Config, par: Parallel, data: TokenData, log=print, faults=None) -> Run:
    """Train cfg.train.steps steps. Returns the Run (run.trainer; run.last: the last logged record
    on rank 0, {} elsewhere). Raises Preempted (every rank alike) when an exit signal stopped it."""
    with build_run(cfg, par, data, log, faults) as run:
        run.steps()
        run.finish()
    return run


def build_run(cfg: Config, par: Parallel, data: TokenData, log=print, faults=None) -> Run:
    """Everything before the first step: the preemption watch, the checkpointer, the trainer
    (resumed per checkpoint.resume), the run directory (rank 0) and the first log lines."""
    # exit signals are recorded from here on (a signal during start-up stops after the first step)
    watch = PreemptionWatch(configured_signals(cfg), par)
    watch.install()
    ckpt = Checkpointer(cfg, par, log, faults)     # faults: checkpoint.Faults test hooks (None: none)
    run = Run(None, ckpt, watch, log)
    try:
        run.trainer = trainer = build_trainer(cfg, par, data)
        trainer.preempt = watch if watch.enabled else None
        ckpt.resume(trainer)      # checkpoint.resume: sets trainer.state.step, model, optimizer, RNG
        if cfg.checkpoint.snapshot_every > 0:
            from moetrain.checkpoint.snapshot import Snapshots
            run.snapshots = Snapshots(cfg, par, log if par.is_main else (lambda m: None))
            if cfg.checkpoint.resume == "auto":
                # a newer in-memory snapshot than the disk checkpoint (a restart after losing a node)
                path = run.snapshots.recover(newer_than=trainer.state.step)
                if path is not None:
                    ckpt.resume_snapshot(trainer, path)
                    run.snapshot_held = True
            else:              # a fresh start or an explicit checkpoint: older snapshots are not this run's
                run.snapshots.wipe()
            run.snapshot_step = trainer.state.step
        run.writer = RunWriter(open_run_dir(cfg, trainer.state.step), cfg.logging.tensorboard) if par.is_main else None
        run.gpu = GpuStats(par.device)
        if par.is_main:
            log(first_line(cfg, par, trainer.model, data.source))
            if run.gpu.reason:
                log(f"moetrain: {run.gpu.reason}")
        run.progress = progress_bar(par.is_main and cfg.train.progress, cfg.train.steps, trainer.state.step)
    except BaseException:
        run.close()
        raise
    return run
