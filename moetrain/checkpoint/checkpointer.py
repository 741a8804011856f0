"""Sharded checkpoints for the training loop: save, resume (also onto another layout), retention,
async save, and the fault-injection hooks the tests use. The checkpoint.* keys: README,
"Checkpoints" (layout: store.py). Async saves write in a background thread on their own gloo group;
rank 0 commits one when its write has finished, noticed at a step boundary or at the next save.

What a checkpoint holds and under which keys: moetrain/checkpoint/state.py. Exact continuation: model,
optimizer, step (which fixes the LR and the data position), tokens seen and every rank's RNG
states, all of them tensors. Resuming at another world size restores rank r's RNG state when
the checkpoint has one for rank r and keeps a fresh one otherwise: random streams (router jitter)
then differ from an uninterrupted run, everything else continues exactly (up to float reduction
order). Reading a checkpoint never runs code from it (checkpoint/store.py, checkpoint/dcp_reader.py): a
crafted one is refused with one line (exit 2 on every rank), never skipped past.

Every resume decision (which checkpoint, or which error) is made by rank 0 alone, from files,
and broadcast: all ranks then load the same checkpoint or raise the same one-line
CheckpointError, and nobody is left waiting in a collective. DCP's own collectives gather an
exception on any rank and re-raise it on every rank, so a read that fails midway (garbage bytes
of the right size) also ends every rank alike, or falls back to an older checkpoint under auto;
what each rank checks after reading (its RNG states, the step) is agreed on the same way.

Fault injection: `faults` (store.Faults, no-ops by default) is called at the top of every step
and at each phase of a commit; the crash-safety tests pass one that kills the process there.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from moetrain.checkpoint import state as S
from moetrain.checkpoint import store
from moetrain.checkpoint.lock import CheckpointLockError, DirLock
from moetrain.checkpoint.store import CheckpointError, Faults
from moetrain.config import Config, to_dict

_IGNORED_GROUPS = ("parallel", "checkpoint", "logging")


@dataclass
class _Pending:
    future: Any
    tmp: str
    step: int
    fields: dict
    started: float
    committed: bool = False
    error: Optional[str] = None


class Checkpointer:
    def __init__(self, cfg: Config, par, log: Callable[[str], None] = print, faults: Optional[Faults] = None):
        c = cfg.checkpoint
        self.cfg, self.par = cfg, par
        self.faults = faults or store.NO_FAULTS
        self.root = c.dir
        self.enabled = c.every > 0
        self.async_save = bool(getattr(c, "async_save", False))
        self._log = log
        self.group = None
        if par.world > 1:
            # The async writer thread runs DCP's collectives concurrently with training: give them
            # a gloo group of their own so they never interleave with the training groups.
            self.group = dist.new_group(backend="gloo") if self.async_save else par.world_group
        self.last_step: Optional[int] = None      # step of the checkpoint last saved or loaded
        self.pending: Optional[_Pending] = None
        self.lock: Optional[DirLock] = None       # rank 0, while saving: checkpoint.dir is ours

    def log(self, msg: str) -> None:
        if self.par.is_main:
            self._log(f"moetrain: {msg}")

    # ------------------------------------------------------------------ resume

    def resume(self, trainer) -> None:
        """Apply checkpoint.resume. Every rank calls this right after build_trainer."""
        try:
            self._resume(trainer)
        except BaseException:
            self.close()                 # a refused or failed resume leaves checkpoint.dir unlocked
            raise

    def _resume(self, trainer) -> None:
        decision = self._decide(trainer) if self.par.is_main else None
        decision = self._broadcast(decision)
        for w in decision["warnings"]:
            self.log(f"warning: {w}")
        for note in decision["notes"]:
            self.log(note)
        if decision["error"]:
            raise CheckpointError(decision["error"])
        candidates = decision["candidates"]
        for i, cand in enumerate(candidates):
            try:
                self._load(trainer, cand)
            except CheckpointError as exc:
                if i + 1 == len(candidates):
                    raise
                self.log(f"warning: {exc}; falling back to {candidates[i + 1]['path']}")
                continue
            self.last_step = cand["step"]
            lay = cand["layout"] or {}
            self.log(f"resumed from {cand['path']} at step {cand['step']} (saved at world {cand['world']}: "
                     + " ".join(f"{k} {lay[k]}" for k in ("dp", "tp", "ep") if k in lay) + ")")
            if cand["world"] != self.par.world:
                self.log(f"note: saved at world {cand['world']}, now {self.par.world}: ranks without a "
                         "saved RNG state keep a fresh one, so random streams differ from an uninterrupted run")
            return

    def resume_snapshot(self, trainer, path: str) -> None:
        """Every rank: load the in-memory snapshot completed at `path` on this rank's node
        (checkpoint/snapshot.py), resharded like a disk checkpoint. Every file's CRC-32 was checked
        once per node by recover(); each rank checks sizes and .metadata's CRC again. Saving into
        checkpoint.dir goes on as before (the snapshot's step is not a disk checkpoint)."""
        error, cand = None, None
        try:
            info = store.verify(path)
            S.check_fits(info.metadata, trainer.model, {"ep": self.par.dims.ep, "tp": self.par.dims.tp}, path)
            m = info.manifest
            cand = {"path": path, "step": info.step, "schema": S.optim_schema(info.metadata),
                    "rng": S.rng_layout(info.metadata, path), "world": m.get("world"), "layout": m.get("layout"),
                    "placement": m.get("placement")}
        except CheckpointError as exc:
            error = str(exc)
        error = self._agree(error)
        if error:
            raise CheckpointError(error)
        self._load(trainer, cand)
        lay = cand["layout"] or {}
        self.log(f"resumed from the in-memory snapshot {path} at step {cand['step']} (saved at world "
                 f"{cand['world']}: " + " ".join(f"{k} {lay[k]}" for k in ("dp", "tp", "ep") if k in lay) + ")")

    def _decide(self, trainer) -> dict:
        """Rank 0: which checkpoints to try, newest first, or one error line. Never raises."""
        out = {"candidates": [], "warnings": [], "notes": [], "error": None}
        try:
            self._decide_into(trainer, out)
        except (CheckpointError, CheckpointLockError) as exc:
            out["error"] = str(exc)
        except Exception as exc:  # an unexpected filesystem error must not strand the other ranks
            out["error"] = f"checkpoint.resume={self.cfg.checkpoint.resume!r}: {type(exc).__name__}: {exc}"
        return out

    def _decide_into(self, trainer, out: dict) -> None:
        c = self.cfg.checkpoint
        if not self.enabled and c.resume == "none":
            return                           # checkpointing off: never touch checkpoint.dir
        removed = self._own_dir(out)
        if removed:
            out["notes"].append(f"removed leftovers of interrupted saves in {self.root}: {', '.join(removed)}")
        if self.enabled:
            self._refuse_foreign_steps()
        if c.resume == "none":
            self._refuse_overwriting("checkpoint.resume=none would mix a new run into them: set "
                                     "checkpoint.resume=auto to continue, or choose another checkpoint.dir")
            return
        if c.resume == "auto":
            infos, warnings = store.find_complete(self.root)
            out["warnings"] += warnings
            if not infos:
                out["notes"].append(f"no complete checkpoint in {self.root}: starting from step 0")
                return
        else:
            infos, warnings = store.resolve_path(c.resume)
            out["warnings"] += warnings
            self._refuse_mixing_runs(infos[0].path)
        sizes = {"ep": self.par.dims.ep, "tp": self.par.dims.tp}
        for i, info in enumerate(infos):
            try:
                store.check_contents(info)       # CRC-32 of every file: damage never loads silently
            except CheckpointError as exc:
                if i + 1 == len(infos):
                    raise
                out["warnings"].append(f"skipping {exc}")
                continue
            try:
                extra = S.check_fits(info.metadata, trainer.model, sizes, info.path, self._config_hint(info.manifest))
            except CheckpointError as exc:
                if i == 0:
                    raise      # the newest complete one does not fit: a config change, not damage
                out["warnings"].append(f"skipping {exc}")
                continue
            out["warnings"] += extra
            if i == 0:
                changed = _config_changes(info.manifest.get("config", {}), to_dict(self.cfg), skip=_IGNORED_GROUPS)
                if changed:
                    out["notes"].append("config differs from the checkpoint's: " + "; ".join(changed))
            out["candidates"].append({
                "path": info.path, "step": info.step, "schema": S.optim_schema(info.metadata),
                "rng": S.rng_layout(info.metadata, info.path),
                "world": info.manifest.get("world"), "layout": info.manifest.get("layout"),
                "placement": info.manifest.get("placement")})

    def _refuse_mixing_runs(self, source: str) -> None:
        """While saving, resume=<path> must be checkpoint.dir's newest complete checkpoint (or the
        dir must hold none): resuming another run's checkpoint would overwrite this dir's step by
        step, and a rewind to an older step would leave the abandoned run's newer checkpoints for
        `resume: auto` to pick up later. Refuse both, as resume=none does."""
        if os.path.dirname(os.path.realpath(source)) != os.path.realpath(self.root):
            self._refuse_overwriting(f"they belong to another run than checkpoint.resume={source!r} and saving "
                                     "would overwrite them: choose an empty checkpoint.dir for the resumed run")
        else:
            self._refuse_overwriting(
                f"checkpoint.resume={source!r} is older: saving would interleave the abandoned steps with the "
                "new run's; move the newer step_* directories away or save into another checkpoint.dir",
                unless=source)

    def _refuse_foreign_steps(self) -> None:
        """A step_NNNNNNNN directory that is not ours (no moetrain manifest) at a step this run may
        save would be in the way of that save: refuse now rather than after hours of training."""
        every, last = self.cfg.checkpoint.every, self.cfg.train.steps
        for step, path in store.list_step_dirs(self.root):
            if 0 < step <= last and (step % every == 0 or step == last):
                why = store.foreign_reason(path)
                if why:
                    raise CheckpointError(f"{path} {why}, and this run saves step {step} there "
                                          f"(checkpoint.every={every}): move it out of checkpoint.dir or choose another one")

    def _refuse_overwriting(self, why: str, unless: Optional[str] = None) -> None:
        """When saving is on and checkpoint.dir already holds complete checkpoints (other than
        `unless` being the newest of them): one line."""
        if not self.enabled:
            return
        complete, _ = store.find_complete(self.root)
        if complete and not (unless and os.path.realpath(complete[0].path) == os.path.realpath(unless)):
            raise CheckpointError(f"checkpoint.dir={self.root!r} already holds checkpoints (newest "
                                  f"{os.path.basename(complete[0].path)}) and {why}")

    def _config_hint(self, manifest: dict) -> str:
        changed = _config_changes(manifest.get("config", {}), to_dict(self.cfg), only=("model", "moe"))
        return "model config changed: " + "; ".join(changed) if changed else ""

    def _load(self, trainer, cand: dict) -> None:
        """Collective over every rank: read this rank's share of one checkpoint."""
        model, par = trainer.model, self.par
        if getattr(trainer, "placer", None) is not None:     # moe.placement=balanced: which experts the slots hold, before the load
            try:
                note = trainer.placer.restore(cand.get("placement"))
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {cand['path']}: {exc}") from None
            if note and par.is_main:
                self.log(note)
        flat: dict[str, Any] = S.model_entries(model, par.mesh)
        flat.update(S.build_optim_state(model, trainer.opt, cand["schema"], par.mesh))
        flat.update(S.train_entries(-1, -1))
        rng_parts = cand["rng"].get(par.rank)
        if rng_parts:
            flat.update(S.rng_targets(par.rank, rng_parts))
        store.load_dcp(flat, cand["path"], self.group)
        step, tokens = int(flat[S.STEP_KEY]), int(flat[S.TOKENS_KEY])
        error, install_rng = None, None
        try:
            if step != cand["step"] or tokens < 0:
                raise ValueError(f"{S.STEP_KEY}={step} and {S.TOKENS_KEY}={tokens}, the manifest says step {cand['step']}")
            if rng_parts:
                install_rng = S.prepare_rng(par.rank, flat, par.device)
        except ValueError as exc:
            error = f"checkpoint {cand['path']}: {exc}"
        error = self._agree(error)        # a bad RNG state of one rank stops every rank
        if error:
            raise CheckpointError(error)
        trainer.state.step, trainer.state.tokens_seen = step, tokens
        if install_rng is not None:
            install_rng()

    # ------------------------------------------------------------------ save

    def on_step(self, trainer) -> None:
        """Top of every loop iteration (all of the previous step is done and logged)."""
        step = trainer.state.step
        self._poll()
        if self.enabled and step > 0 and step % self.cfg.checkpoint.every == 0 and step != self.last_step:
            self.save(trainer)
        self.faults.at_step(step, self.par.rank)

    def _own_dir(self, out: dict) -> list[str]:
        """Rank 0, before anything else touches checkpoint.dir: a saving run takes its lock for the
        whole run (CheckpointLockError: another run's live lock, one line); a read-only run
        (every=0) takes it only to clean up, and leaves a locked directory alone. Then remove
        interrupted saves' leftovers: only the lock's holder may, they could be a live run's."""
        if not self.enabled and not os.path.isdir(self.root):
            return []
        lock = DirLock(self.root)
        if self.enabled:
            self.lock = lock
            warning = lock.acquire()
        else:
            try:
                warning = lock.acquire()
            except CheckpointLockError:
                return []
        if warning:
            out["warnings"].append(warning)
        try:
            return store.remove_stale(self.root)
        finally:
            if not self.enabled:
                lock.release()

    def close(self) -> None:
        """Release checkpoint.dir's lock (rank 0; no collective; idempotent). finish() calls it
        after the last commit; run_training on every way out."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    def finish(self, trainer) -> None:
        """After the last step: the final save (when enabled), then wait for any async write."""
        step = trainer.state.step
        try:
            if self.enabled and step > 0 and step != self.last_step:
                self.save(trainer)
            self.wait()
        finally:
            self.close()                 # after the last commit (or its failure): the dir is free

    def save(self, trainer) -> None:
        self.faults.before_save(trainer.state.step)
        self.wait()                      # at most one save in flight; it must be committed first
        step, par = trainer.state.step, self.par
        started = time.perf_counter()
        flat: dict[str, Any] = S.save_entries(trainer, par)
        fields = self._manifest_fields(trainer)
        tmp = store.tmp_dir_for(self.root, step)
        future = store.save_dcp(flat, tmp, self.group, async_save=self.async_save)
        self.last_step = step
        self.pending = _Pending(future, tmp, step, fields, started)
        if future is None:
            self.wait()
        else:
            self.log(f"checkpoint step {step}: async write started ({time.perf_counter() - started:.2f}s blocking)")

    def _poll(self) -> None:
        """Rank 0 commits a finished async write early (no collective; wait() reports errors)."""
        p = self.pending
        if p is None or p.future is None or not self.par.is_main or p.committed or not p.future.done():
            return
        self._commit(p)

    def wait(self) -> None:
        """Every rank: finish the pending save; rank 0 commits; all agree on success or raise."""
        p, self.pending = self.pending, None
        if p is None:
            return
        error = None
        if p.future is not None:
            try:
                p.future.result()
            except BaseException as exc:   # DCP's CheckpointException is a BaseException
                error = f"saving checkpoint step {p.step} failed: {store.describe_dcp_error(exc)}"
        if error is None and self.par.is_main:
            if not p.committed:
                self._commit(p)
            error = p.error
        error = self._broadcast(error)
        if error:
            raise CheckpointError(error)

    def _commit(self, p: _Pending) -> None:
        p.committed = True
        try:
            if self.lock is not None:
                self.lock.check()        # another run took checkpoint.dir over: never commit into it
            fields = dict(p.fields, save_s=round(time.perf_counter() - p.started, 3))
            path = store.commit(p.tmp, self.root, p.step, fields, self.faults)
            removed = store.prune(self.root, self.cfg.checkpoint.keep_last, p.step)
        except Exception as exc:
            p.error = f"committing checkpoint step {p.step} in {self.root} failed: {type(exc).__name__}: {exc}"
            shutil.rmtree(p.tmp, ignore_errors=True)
            return
        msg = f"checkpoint saved: {path} ({time.perf_counter() - p.started:.2f}s)"
        if removed:
            msg += f"; removed {', '.join(os.path.basename(r) for r in removed)} (keep_last={self.cfg.checkpoint.keep_last})"
        self.log(msg)

    def _manifest_fields(self, trainer) -> dict:
        return {**S.manifest_fields(trainer, self.par), "num_experts": self.cfg.moe.num_experts,
                "async_save": self.async_save, "torch_version": torch.__version__, "config": to_dict(self.cfg)}

    def _agree(self, error: Optional[str]) -> Optional[str]:
        """Every rank: the error of the lowest rank that has one, or None when none has."""
        if self.par.world == 1:
            return error
        cuda_group = self.group is self.par.world_group and self.par.device.type == "cuda"
        device = self.par.device if cuda_group else torch.device("cpu")
        first = torch.tensor([self.par.rank if error else self.par.world], device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.group)
        src = int(first.item())
        if src == self.par.world:
            return None
        box = [error]
        dist.broadcast_object_list(box, src=src, group=self.group, device=device if cuda_group else None)
        return box[0]

    def _broadcast(self, obj):
        if self.par.world == 1:
            return obj
        box = [obj]
        cuda_group = self.group is self.par.world_group and self.par.device.type == "cuda"
        dist.broadcast_object_list(box, src=0, group=self.group, device=self.par.device if cuda_group else None)
        return box[0]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_changes(saved: dict, now: dict, only: tuple = (), skip: tuple = ()) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    out = []
    for key in sorted(set(a) | set(b)):
        group = key.split(".", 1)[0]
        if (only and group not in only) or group in skip:
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key} {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out

