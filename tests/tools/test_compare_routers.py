"""tools/compare_routers.py: trains recipes side by side, tabulates them, and --reuse skips runs
that already reached the budget with the same settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
import pytest
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden=32", "model.max_seq_len=16",
        "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2", "train.eval_batches=1",
        "train.warmup_steps=1", "train.num_threads=1", "data.source=stdlib", "train.device=cpu"]


def _run(out, *extra, sets=()):
    cmd = [sys.executable, str(ROOT / "tools" / "compare_routers.py"), "--steps", "3", "--eval-every", "3",
           "--log-every", "1", "--out", str(out), *extra, "--set", *TINY, *sets]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_two_recipes_at_once_then_reuse(tmp_path):
    first = _run(tmp_path, "--jobs", "2", "tiny_cpu", "switch")
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert [r["recipe"] for r in rows] == ["tiny_cpu", "switch"]
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "val_loss.png").is_file()
    again = _run(tmp_path, "--reuse", "tiny_cpu", "switch")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reusing") == 2
    assert [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")] == rows
    other = _run(tmp_path, "--reuse", "tiny_cpu", sets=["train.seed=7"])   # other settings: trained again
    assert other.returncode == 0, other.stderr[-2000:]
    assert "reusing" not in other.stdout
