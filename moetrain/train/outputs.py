"""What a run shows and keeps besides its checkpoints: the run directory (config.yaml, and a
metrics.jsonl kept consistent across restarts), the first log line, the progress bar. The
records themselves are written by metrics.RunWriter; the loop (train/loop.py) decides when."""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from moetrain.config import Config, to_yaml
from moetrain.model.transformer import Transformer, count_params
from moetrain.moe.experts import choose_impl
from moetrain.parallel.mesh import Parallel
from moetrain.precision import uses_bf16_autocast


def open_run_dir(cfg: Config, start_step: int) -> str:
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
        truncate_metrics(metrics, start_step)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return run_dir


def truncate_metrics(path: str, last_step: int) -> None:
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


def first_line(cfg: Config, par: Parallel, model: Transformer, data_source: str) -> str:
    """Rank 0's first log line: the layout, the device, the model's size, the data, the experts'
    kernel and the numerics."""
    total_params, active_params = count_params(model, cfg)
    return (f"moetrain: world {par.world} (dp {par.dims.dp}, tp {par.dims.tp}, ep {par.dims.ep}) on "
            f"{par.device}; {total_params / 1e6:.2f}M params, {active_params / 1e6:.2f}M active; data {data_source}"
            f"{_expert_impl_note(cfg, par)}{_numerics_note(cfg, par)}")


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


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0)
