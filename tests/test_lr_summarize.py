"""Pure math of a step's bookkeeping, by hand: the learning-rate schedule (train/lr.py) and the
metric keys a gathered StepRecord turns into (metrics.summarize)."""
from __future__ import annotations

import math

import pytest
import torch

from moetrain.metrics import A2A_PHASES, StepRecord, StepStats, summarize
from moetrain.train.lr import lr_at


# ----------------------------------------------------------------------------- lr_at

@pytest.mark.parametrize("step, expected", [
    (0, 0.25), (1, 0.5), (3, 1.0),          # linear warmup over 4 steps: (step + 1) / 4
    (4, 1.0),                               # decay starts at the peak (progress 0)
    (6, 0.1 + 0.45 * (1 + math.cos(math.pi / 4))),   # progress 2/8: 0.868198...
    (8, 0.55),                              # halfway: the mean of peak and floor
    (12, 0.1), (20, 0.1),                   # the floor (0.1 * lr) at the last step and after
])
def test_lr_warmup_then_cosine(step, expected):
    assert lr_at(step, 1.0, 4, 12, 0.1) == pytest.approx(expected, rel=1e-12)


def test_lr_scales_with_base_lr_and_edge_schedules():
    assert lr_at(8, 3e-3, 4, 12, 0.1) == pytest.approx(3e-3 * 0.55, rel=1e-12)
    # no warmup: step 0 is already the peak; min_lr_ratio 0 ends at zero
    assert lr_at(0, 2.0, 0, 10, 0.0) == 2.0
    assert lr_at(5, 2.0, 0, 10, 0.0) == pytest.approx(1.0, rel=1e-12)
    assert lr_at(10, 2.0, 0, 10, 0.0) == pytest.approx(0.0, abs=1e-15)
    # all steps are warmup: one decay step (max(1, 0)) goes from the peak to the floor
    assert lr_at(3, 1.0, 4, 4, 0.5) == 1.0
    assert lr_at(4, 1.0, 4, 4, 0.5) == 1.0
    assert lr_at(5, 1.0, 4, 4, 0.5) == pytest.approx(0.5, rel=1e-12)


# ----------------------------------------------------------------------------- summarize

def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _record() -> StepRecord:
    """Two ranks, one MoE layer, two experts."""
    return StepRecord(
        step_ms=_t([100.0, 200.0]), a2a_bytes=_t([2.0 ** 20, 2.0 ** 21]), micro_steps=_t([2.0, 2.0]),
        # phases: counts, dispatch, combine, dispatch_bwd, combine_bwd
        a2a_ms=_t([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 10.0, 10.0, 0.0, 0.0]]),
        routed=_t([[[9.0, 2.0]], [[3.0, 2.0]]]), kept=_t([[[6.0, 2.0]], [[3.0, 1.0]]]),
        entropy=_t([[1.0], [2.0]]), recv=_t([[6.0], [10.0]]))


KEYS = ["a2a_ms", "a2a_frac", "ranks.a2a_ms", "ranks.a2a_dispatch_ms", "ranks.a2a_combine_ms", "ranks.a2a_bwd_ms",
        "ranks.a2a_mb", "ranks.step_ms", "drop_frac", "ranks.recv_tokens", "rank_imbalance", "moe.layer0.routed",
        "moe.layer0.kept", "moe.layer0.drop_frac", "moe.layer0.expert_imbalance", "moe.layer0.load_cv",
        "moe.layer0.entropy", "moe.layer0.recv_tokens", "expert_imbalance"]


def test_summarize_by_hand():
    out = summarize(_record())
    assert list(out) == KEYS                          # metrics.jsonl's key order
    assert out["a2a_ms"] == pytest.approx(17.5)       # ranks: 1+2+3+4+5 = 15 and 10+10 = 20 ms
    assert out["a2a_frac"] == pytest.approx(0.125)    # mean(15/100, 20/200)
    assert out["ranks.a2a_ms"] == [15.0, 20.0]
    assert out["ranks.a2a_dispatch_ms"] == [3.0, 10.0]     # counts + dispatch
    assert out["ranks.a2a_combine_ms"] == [3.0, 10.0]
    assert out["ranks.a2a_bwd_ms"] == [9.0, 0.0]           # dispatch_bwd + combine_bwd
    assert out["ranks.a2a_mb"] == [1.0, 2.0]
    assert out["ranks.step_ms"] == [100.0, 200.0]
    assert out["drop_frac"] == pytest.approx(0.25)         # kept 9 + 3 of routed 12 + 4
    assert out["ranks.recv_tokens"] == [6.0, 10.0]
    assert out["rank_imbalance"] == pytest.approx(1.25)    # 10 / mean(6, 10)
    assert out["moe.layer0.routed"] == [12.0, 4.0]
    assert out["moe.layer0.kept"] == [9.0, 3.0]
    assert out["moe.layer0.drop_frac"] == pytest.approx(0.25)
    assert out["moe.layer0.expert_imbalance"] == pytest.approx(1.5)     # 12 / mean(12, 4)
    assert out["moe.layer0.load_cv"] == pytest.approx(0.5)              # population std 4 / mean 8
    assert out["moe.layer0.entropy"] == pytest.approx(0.75)             # mean(1/2, 2/2) per micro-step
    assert out["moe.layer0.recv_tokens"] == [6.0, 10.0]
    assert out["expert_imbalance"] == pytest.approx(1.5)


def test_summarize_counts_tp_ranks_once():
    """TP ranks route the same tokens: counts are divided by tp, ratios do not change."""
    one, two = summarize(_record()), summarize(_record(), tp=2)
    assert two["moe.layer0.routed"] == [6.0, 2.0] and two["moe.layer0.kept"] == [4.5, 1.5]
    assert two["ranks.recv_tokens"] == [3.0, 5.0]
    for key in ("drop_frac", "rank_imbalance", "moe.layer0.expert_imbalance", "moe.layer0.load_cv",
                "moe.layer0.entropy", "a2a_ms"):
        assert two[key] == pytest.approx(one[key])


def test_summarize_without_moe_layers_and_nothing_routed():
    rec = _record()
    dense = StepRecord(rec.step_ms, rec.a2a_bytes, rec.micro_steps, rec.a2a_ms, rec.routed[:, :0], rec.kept[:, :0],
                       rec.entropy[:, :0], rec.recv[:, :0])
    out = summarize(dense)
    assert list(out) == KEYS[:8] + ["drop_frac"] and out["drop_frac"] == 0.0
    idle = summarize(StepRecord(*(t * 0 for t in (rec.step_ms, rec.a2a_bytes, rec.micro_steps, rec.a2a_ms,
                                                    rec.routed, rec.kept, rec.entropy, rec.recv))))
    assert idle["drop_frac"] == 0.0 and idle["rank_imbalance"] == 1.0 and idle["moe.layer0.expert_imbalance"] == 1.0
    assert idle["a2a_frac"] == 0.0 and idle["moe.layer0.entropy"] == 0.0


def test_step_stats_record_round_trip_at_world_1():
    """StepStats -> its StepRecord (fields named, [1, ...]) -> gather (no collective at world 1)."""
    stats = StepStats(num_layers=2, num_experts=3)
    stats.routed_LE += _t([[1, 2, 3], [4, 5, 6]])
    stats.kept_LE += _t([[1, 2, 2], [4, 4, 6]])
    stats.entropy_L += _t([0.5, 0.25])
    stats.recv_L += _t([6, 15])
    stats.micro_steps = 2
    local = stats.record(step_ms=12.5)
    assert local.routed.shape == (1, 2, 3) and local.a2a_ms.shape == (1, len(A2A_PHASES))
    rec = local.gather(group=None, world=1)
    assert rec.step_ms.tolist() == [12.5] and rec.micro_steps.tolist() == [2.0] and rec.a2a_bytes.tolist() == [0.0]
    assert rec.a2a_ms.tolist() == [[0.0] * len(A2A_PHASES)]
    assert rec.routed.tolist() == [[[1, 2, 3], [4, 5, 6]]] and rec.kept.tolist() == [[[1, 2, 2], [4, 4, 6]]]
    assert rec.entropy.tolist() == [[0.5, 0.25]] and rec.recv.tolist() == [[6, 15]]
    assert summarize(rec)["moe.layer1.drop_frac"] == pytest.approx(1 - 14 / 15)
