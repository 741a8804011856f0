"""The training path never imports the `hf` extra (transformers, tokenizers, pyarrow): a user who
installed moetrain without it trains, and a cluster job does not pay their import time."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from _train import TINY_3D

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ("transformers", "tokenizers", "pyarrow", "datasets", "moetrain.hf")


def test_training_run_imports_no_optional_dependency(tmp_path):
    args = [*TINY_3D, "train.device=cpu", "train.steps=2", f"logging.dir={tmp_path}/runs",
            f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.every=1"]
    code = textwrap.dedent(f"""
        import sys
        from moetrain.train import cli
        rc = cli.main(["--config", "configs/tiny_cpu.yaml", *{args!r}])
        assert rc in (0, None), rc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r} or m in {OPTIONAL!r})
        print("LOADED", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout[-2000:]
