#!/usr/bin/env python
"""Expert-load report of a run: PNG heatmaps and curves from its metrics.jsonl.

    python tools/expert_load_report.py runs/tiny                 # writes runs/tiny/report/*.png
    python tools/expert_load_report.py runs/tiny --out docs/img --prefix ep4_

Reads <run_dir>/metrics.jsonl (rank 0's log; keys documented in README "Metrics"); a step logged
twice (a resumed run appends) keeps its last record. Writes to --out (default <run_dir>/report):
  expert_load.png   one heatmap per MoE layer, expert x step, colour = the expert's share of the
                    layer's routed copies times the number of experts (1 = perfectly balanced,
                    from moe.layer{i}.routed), and a layer x expert heatmap of the mean over steps
  rank_tokens.png   rows each rank's experts processed per step (ranks.recv_tokens) and the
                    max/mean imbalance across ranks (rank_imbalance)
  drop_rate.png     share of routed copies dropped by capacity: overall (drop_frac) and per layer
                    (moe.layer{i}.drop_frac)
  a2a_time.png      all-to-all ms per step for each rank (ranks.a2a_ms), the mean (a2a_ms) and
                    the share of the step (a2a_frac)
  placement.png     only for moe.placement=balanced runs: the measured rank imbalance with each
                    re-placement's predicted imbalance before and after (placement.layer{i}.
                    imbalance_before / _after), per layer the replicas of every expert at each
                    re-placement (placement.layer{i}.replicas) and the last placement as a
                    rank x expert map (placement.layer{i}.experts_per_rank)
and prints a short text summary (most and least loaded experts, imbalance, drops, a2a share).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

LAYER_KEY = re.compile(r"^moe\.layer(\d+)\.routed$")


class ReportError(RuntimeError):
    """One line: what is missing from the run directory."""


def read_records(run_dir: str, metrics: str | None = None) -> list[dict]:
    path = metrics or os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"no metrics file {path!r} (is {run_dir!r} a run directory?)")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ReportError(f"{path}:{n}: not a JSON line") from None
            if "loss" in rec and "step" in rec:        # skip eval-only records (older runs' step-0 line)
                by_step[int(rec["step"])] = rec
    if not by_step:
        raise ReportError(f"{path} holds no training steps")
    return [by_step[s] for s in sorted(by_step)]


def layer_ids(records: list[dict]) -> list[int]:
    ids = sorted({int(m.group(1)) for r in records for k in r if (m := LAYER_KEY.match(k))})
    if not ids:
        raise ReportError("metrics hold no moe.layer<i>.routed keys (a dense model, or an old run?)")
    return ids


def load_matrix(records: list[dict], layer: int):
    """[experts, steps] share of routed copies x experts (1 = balanced); NaN where not logged."""
    import numpy as np
    key = f"moe.layer{layer}.routed"
    num_e = max(len(r[key]) for r in records if key in r)
    m = np.full((num_e, len(records)), np.nan)
    for j, r in enumerate(records):
        v = r.get(key)
        if v:
            a = np.asarray(v, dtype=float)
            tot = a.sum()
            if tot > 0:
                m[:len(a), j] = a / tot * len(a)
    return m


def series(records: list[dict], key: str):
    import numpy as np
    return np.array([float(r[key]) if r.get(key) is not None else np.nan for r in records])


def per_rank(records: list[dict], key: str):
    """[steps, ranks] from a list-valued key (NaN where missing)."""
    import numpy as np
    width = max((len(r[key]) for r in records if isinstance(r.get(key), list)), default=0)
    out = np.full((len(records), width), np.nan)
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, list):
            out[i, :len(v)] = v
    return out


def _fig(plt, rows: int, height: float = 2.6, width: float = 9.0):
    return plt.subplots(rows, 1, figsize=(width, max(3.0, height * rows)), squeeze=False)


def plot_expert_load(records, layers, png, title):
    import matplotlib.pyplot as plt
    import numpy as np
    steps = [r["step"] for r in records]
    mats = [load_matrix(records, i) for i in layers]
    vmax = max(2.0, float(np.nanpercentile(np.concatenate([m.ravel() for m in mats]), 99)))
    n = len(layers)
    fig, axes = _fig(plt, n + 1, height=2.3)
    for ax, i, m in zip(axes[:, 0], layers, mats):
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, m.shape[0] - 0.5))
        ax.set_ylabel(f"layer {i}\nexpert")
        fig.colorbar(im, ax=ax, pad=0.01, label="load x E")
    axes[n - 1, 0].set_xlabel("step")
    mean = np.full((n, max(m.shape[0] for m in mats)), np.nan)
    for row, m in enumerate(mats):
        mean[row, :m.shape[0]] = np.nanmean(m, axis=1)
    ax = axes[n, 0]
    im = ax.imshow(mean, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(n))
    ax.set_yticklabels([str(i) for i in layers])
    ax.set_ylabel("layer")
    ax.set_xlabel("expert (mean over steps)")
    fig.colorbar(im, ax=ax, pad=0.01, label="load x E")
    axes[0, 0].set_title(f"{title}: expert load (share of routed copies x E; 1 = balanced)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return mats


def plot_rank_tokens(records, png, title):
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    recv = per_rank(records, "ranks.recv_tokens")
    fig, axes = _fig(plt, 2)
    ax = axes[0, 0]
    for k in range(recv.shape[1]):
        ax.plot(steps, recv[:, k], lw=1.2, label=f"rank {k}")
    ax.set_ylabel("rows processed by\nthe rank's experts")
    ax.set_title(f"{title}: tokens received per rank (ranks.recv_tokens)")
    ax.legend(ncol=min(8, max(1, recv.shape[1])), fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, series(records, "rank_imbalance"), color="k", lw=1.2)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_ylabel("max / mean over ranks")
    ax.set_xlabel("step")
    for a in axes[:, 0]:
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_drop_rate(records, layers, png, title):
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    fig, axes = _fig(plt, 1, height=3.6)
    ax = axes[0, 0]
    ax.plot(steps, 100 * series(records, "drop_frac"), color="k", lw=2, label="all layers")
    for i in layers:
        ax.plot(steps, 100 * series(records, f"moe.layer{i}.drop_frac"), lw=1, alpha=0.8, label=f"layer {i}")
    ax.set_ylabel("routed copies dropped (%)")
    ax.set_xlabel("step")
    ax.set_title(f"{title}: capacity drops")
    ax.grid(True, alpha=0.3)
    ax.legend(ncol=min(6, len(layers) + 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_a2a(records, png, title):
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    ranks = per_rank(records, "ranks.a2a_ms")
    fig, axes = _fig(plt, 2)
    ax = axes[0, 0]
    for k in range(ranks.shape[1]):
        ax.plot(steps, ranks[:, k], lw=1, alpha=0.8, label=f"rank {k}")
    ax.plot(steps, series(records, "a2a_ms"), color="k", lw=2, label="mean")
    ax.set_ylabel("all-to-all ms / step")
    if (ranks > 0).any():          # world 1 has no all-to-all: keep a linear axis of zeros
        ax.set_yscale("log")
    ax.set_title(f"{title}: all-to-all time (fwd + bwd, incl. waiting for peers)")
    ax.legend(ncol=min(8, ranks.shape[1] + 1), fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, 100 * series(records, "a2a_frac"), color="tab:red", lw=1.2)
    ax.set_ylabel("share of step (%)")
    ax.set_xlabel("step")
    for a in axes[:, 0]:
        a.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


PLACEMENT_KEY = re.compile(r"^placement\.layer(\d+)\.replicas$")


def placement_layers(records: list[dict]) -> list[int]:
    return sorted({int(m.group(1)) for r in records for k in r if (m := PLACEMENT_KEY.match(k))})


def plot_placement(records, layers, png, title):
    """Re-placements of moe.placement=balanced (records carrying placement.* keys)."""
    import matplotlib.pyplot as plt
    import numpy as np
    events = [r for r in records if any(f"placement.layer{i}.replicas" in r for i in layers)]
    steps = [r["step"] for r in records]
    ev_steps = [r["step"] for r in events]
    fig, axes = _fig(plt, 1 + 2 * len(layers), height=2.4)
    ax = axes[0, 0]
    ax.plot(steps, series(records, "rank_imbalance"), color="k", lw=1, label="measured (rank_imbalance)")
    for i in layers:
        ax.plot(ev_steps, [r.get(f"placement.layer{i}.imbalance_before", np.nan) for r in events], "x", ms=6,
                label=f"layer {i} before")
        ax.plot(ev_steps, [r.get(f"placement.layer{i}.imbalance_after", np.nan) for r in events], "o", ms=4,
                mfc="none", label=f"layer {i} after")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_ylabel("max / mean rank load")
    ax.set_title(f"{title}: expert placement (re-placements at {len(events)} steps)")
    ax.legend(ncol=min(6, 1 + 2 * len(layers)), fontsize=7)
    ax.grid(True, alpha=0.3)
    for row, i in enumerate(layers):
        reps = np.array([r.get(f"placement.layer{i}.replicas", []) for r in events], dtype=float)
        ax = axes[1 + 2 * row, 0]
        if reps.ndim == 2 and reps.size:
            im = ax.imshow(reps.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                           vmin=1, vmax=max(2.0, float(reps.max())))
            fig.colorbar(im, ax=ax, pad=0.01, label="replicas")
            ax.set_xticks(range(len(ev_steps)))
            ax.set_xticklabels([str(s) for s in ev_steps], fontsize=7)
        ax.set_ylabel(f"layer {i}\nexpert")
        ax.set_xlabel("re-placement at step")
        last = next((r[f"placement.layer{i}.experts_per_rank"] for r in reversed(events)
                     if f"placement.layer{i}.experts_per_rank" in r), [])
        ax = axes[2 + 2 * row, 0]
        E = reps.shape[1] if reps.ndim == 2 and reps.size else 0
        held = np.zeros((len(last), E))
        for rank, ids in enumerate(last):
            for e in ids:
                if 0 <= e < E:
                    held[rank, e] = 1
        ax.imshow(held, aspect="auto", origin="lower", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"layer {i}\nrank")
        ax.set_xlabel(f"expert (held at step {ev_steps[-1] if ev_steps else '-'})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def text_summary(records, layers, mats) -> str:
    import numpy as np
    last = records[-1]
    lines = [f"steps {records[0]['step']}..{last['step']} ({len(records)} logged), "
             f"world {len(last.get('ranks.step_ms', [])) or '?'}"]
    for i, m in zip(layers, mats):
        mean = np.nanmean(m, axis=1)
        order = np.argsort(-mean)
        lines.append(f"layer {i}: busiest experts {[int(e) for e in order[:3]]} at "
                     f"{[round(float(mean[e]), 2) for e in order[:3]]} x balanced, idlest {int(order[-1])} at "
                     f"{float(mean[order[-1]]):.2f}; drop {100 * np.nanmean(series(records, f'moe.layer{i}.drop_frac')):.1f}%")
    imb = series(records, "rank_imbalance")
    a2a = series(records, "a2a_frac")
    lines.append(f"rank imbalance (max/mean tokens): mean {np.nanmean(imb):.2f}, worst {np.nanmax(imb):.2f}; "
                 f"drops {100 * np.nanmean(series(records, 'drop_frac')):.1f}%; "
                 f"all-to-all {np.nanmean(series(records, 'a2a_ms')):.1f} ms/step = {100 * np.nanmean(a2a):.0f}% of the step")
    return "\n".join(lines)


def build_report(run_dir: str, out: str | None = None, prefix: str = "", title: str | None = None,
                 metrics: str | None = None) -> dict:
    """Write the four PNGs; returns {name: path} and the text summary under "summary"."""
    import matplotlib
    matplotlib.use("Agg")
    records = read_records(run_dir, metrics)
    layers = layer_ids(records)
    out = out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    title = title or os.path.basename(os.path.normpath(run_dir))
    paths = {name: os.path.join(out, f"{prefix}{name}.png")
             for name in ("expert_load", "rank_tokens", "drop_rate", "a2a_time")}
    mats = plot_expert_load(records, layers, paths["expert_load"], title)
    plot_rank_tokens(records, paths["rank_tokens"], title)
    plot_drop_rate(records, layers, paths["drop_rate"], title)
    plot_a2a(records, paths["a2a_time"], title)
    summary = text_summary(records, layers, mats)
    placed = placement_layers(records)
    if placed:
        paths["placement"] = os.path.join(out, f"{prefix}placement.png")
        plot_placement(records, placed, paths["placement"], title)
        events = [r for r in records if "placement.move_ms" in r]
        moved = sum(r.get("placement.layers_moved", 0) for r in events)
        summary += (f"\nplacement: {len(events)} re-placements, {moved} layer moves, "
                    f"{sum(r['placement.move_ms'] for r in events) / max(1, len(events)):.1f} ms each on average")
    return dict(paths, summary=summary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="expert_load_report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="<logging.dir>/<logging.run_name> of a run")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    ap.add_argument("--prefix", default="", help="prefix for the PNG file names")
    ap.add_argument("--title", default=None, help="plot title (default: the run name)")
    ap.add_argument("--metrics", default=None, help="a metrics file other than RUN_DIR/metrics.jsonl")
    args = ap.parse_args(argv)
    try:
        res = build_report(args.run_dir, args.out, args.prefix, args.title, args.metrics)
    except ReportError as exc:
        print(f"expert_load_report: error: {exc}", file=sys.stderr)
        return 2
    print(res.pop("summary"))
    for name, path in res.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
