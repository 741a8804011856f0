"""tools/gpu_check.sh: the whole GPU check at toy sizes on the CPU (--dry-run), so the script
cannot rot between the rare runs on a GPU; and its checks fail when the numbers are wrong."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")


@pytest.fixture(scope="module")
def gc():
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import gpu_check
    return gpu_check


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    summary = json.loads((out / "gpu_check.json").read_text())
    failed = [(s["name"], s.get("error")) for s in summary["steps"] if not s["ok"]]
    assert proc.returncode == 0 and summary["ok"] and not failed, (failed, proc.stdout[-2000:])
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "pytest_gpu", "impls", "recipes", "deepspeed", "checkpoint", "snapshot", "layouts",
                           "bench", "syncs"]
    assert summary["dry_run"] and summary["machine"]["torch"]
    assert set(steps["impls"]["details"]) >= {"grouped", "bmm", "loop"}
    assert steps["impls"]["details"]["grouped"]["experts"].startswith("grouped")
    assert len(steps["recipes"]["details"]) >= 10
    assert steps["checkpoint"]["details"]["bitwise_equal"] is True
    assert steps["snapshot"]["details"]["bitwise_equal"] is True and steps["snapshot"]["details"]["snapshot_mb"] > 0
    assert set(steps["layouts"]["details"]) == {"world1", "ep2", "ep4", "tp2_ep2", "fsdp2", "balanced_ep2"}
    assert {r["impl"] for r in steps["bench"]["details"]["records"] if r["system"] == "moetrain"} == \
        {"grouped", "bmm", "loop"}
    syncs = steps["syncs"]["details"]
    assert syncs["world1"]["per_layer_micro_step"] == 0 and syncs["ep2"]["per_layer_micro_step"] == 1
    assert syncs["ep2"]["by_op"] == {"to_host": 2 * syncs["ep2"]["moe_layers"] * syncs["ep2"]["micro_steps"]}


def test_without_a_gpu_it_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", "/tmp/unused-gpu-check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU visible" in proc.stderr
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--only", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown step(s) nope" in proc.stderr


class _FakeCtx:
    """Stands in for gpu_check.Ctx: train() returns prepared loss curves by run name."""
    dry = True

    def __init__(self, curves):
        self.curves = curves

    def steps(self, gpu, dry):
        return dry

    def train(self, name, overrides, steps, nproc=1, **kw):
        return {"losses": self.curves.get(name, self.curves["default"]), "records": [{"tokens_per_s": 1.0}],
                "stdout": ""}


def test_layouts_check_fails_when_a_curve_differs(gc):
    ref = [5.0, 4.0, 3.0]
    assert gc.step_layouts(_FakeCtx({"default": ref}))["ep2"]["max_rel_diff"] == 0
    with pytest.raises(gc.CheckFailed, match="ep4: loss curve differs from world 1 by 1.00e-03"):
        gc.step_layouts(_FakeCtx({"default": ref, "layout_ep4": [5.0, 4.004, 3.0]}))


def test_impls_check_fails_when_implementations_disagree(gc):
    with pytest.raises(gc.CheckFailed, match="the three expert implementations end"):
        gc.step_impls(_FakeCtx({"default": [5.0, 4.0], "impl_loop": [5.0, 4.5]}))
