"""tools/calibrate_hardware.py: the fit and file helpers by hand; a --quick calibration (1 and 2
gloo ranks) writes a hardware file plan_layout accepts, and its optional fields reach
plan.step_time. No timing assertions (the machine is shared)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _tools import load_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "calibrate_hardware.py"
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def cal():
    return load_tool("calibrate_hardware")


def test_fit_line_by_hand(cal):
    a, b = cal.fit_line([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])     # y = 1 + 2x
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)
    assert cal.fit_line([2.0], [4.0]) == (0.0, 2.0)


def test_gemm_shapes_follow_the_config(cal):
    from moetrain.config import load_config
    cfg = load_config(str(CONFIG), ["train.device=cpu"])
    shapes = cal.gemm_shapes(cfg, 2048)
    D, L = cfg.model.dim, cfg.model.n_layers
    assert (2048, D, D, 4 * L) in shapes                          # q, k, v, o per layer
    assert (2048, D, cfg.model.vocab_size, 1) in shapes           # head
    rows = 2048 * cfg.moe.routed_top_k // cfg.moe.num_ffn_experts
    assert (rows, D, cfg.expert_hidden, 2 * cfg.moe.num_ffn_experts * L) in shapes


def test_for_ranks_and_fixed_costs():
    """by_local_ranks picks the entry for the ranks sharing a node (or the largest below); the
    optional fixed costs add to the step time and are 0 for the presets."""
    from moetrain import plan as P
    from moetrain.config import load_config
    hw = P.Hardware("x", 1.0, 10.0, 1.0, 1.0, compute_efficiency=1.0, comm_efficiency=1.0,
                    by_local_ranks={1: {"bf16_tflops": 2.0}, 4: {"bf16_tflops": 0.5, "layer_overhead_ms": 1.0}})
    assert hw.for_ranks(1).bf16_tflops == 2.0 and hw.for_ranks(2).bf16_tflops == 2.0
    assert hw.for_ranks(4).bf16_tflops == 0.5 and hw.for_ranks(8).layer_overhead_ms == 1.0
    cfg = load_config(str(CONFIG), ["train.device=cpu"])
    lay = P.Layout(4, 1, 4)
    pl = P.plan(cfg, lay, micro_batch=4)
    st = P.step_time(cfg, pl, hw, 4)
    assert st.overhead == pytest.approx(cfg.model.n_layers * pl.micro_steps * 1e-3)
    base = P.step_time(cfg, pl, P.Hardware("y", 0.5, 10.0, 1.0, 1.0, compute_efficiency=1.0, comm_efficiency=1.0), 4)
    assert base.overhead == 0 and base.optimizer == 0
    assert st.total == pytest.approx(base.total + st.overhead)
    lat = P.step_time(cfg, pl, P.Hardware("z", 0.5, 10.0, 1.0, 1.0, compute_efficiency=1.0, comm_efficiency=1.0,
                                          collective_latency_us=100.0), 4)
    calls = 5 * P.routed_moe_layers(cfg) * pl.micro_steps       # a2a: counts + 4 phases
    assert lat.a2a_intra == pytest.approx(base.a2a_intra + calls * 1e-4)


@pytest.mark.slow
def test_quick_calibration_writes_a_file_plan_layout_accepts(tmp_path):
    out = tmp_path / "cpu_quick.yaml"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--worlds", "1,2",
                           "--config", str(CONFIG), "--set", "train.device=cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# ") and "load" in text           # says what, how, when, under what load
    data = yaml.safe_load(text)
    from moetrain.plan import Hardware
    assert set(data) <= set(Hardware.__dataclass_fields__)
    assert sorted(data["by_local_ranks"]) == [1, 2]
    for key in ("bf16_tflops", "intra_node_GBps", "compute_efficiency"):
        assert data[key] > 0
    assert "intra_node_GBps" in data["by_local_ranks"][2]
    plan = subprocess.run([sys.executable, str(REPO / "tools" / "plan_layout.py"), "--config", str(CONFIG),
                           "--gpus", "2", "--gpus-per-node", "2", "--hardware", str(out), "--precision", "fp32",
                           "--global-batch", "16", "--seq-len", "256", "--micro-batch", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "dp2-tp1-ep2-native" in plan.stdout and "recommended" in plan.stdout
