"""Graceful preemption (moetrain/train/preempt.py): a real SIGTERM mid-run finishes the step, saves
a checkpoint on every rank, logs one line on rank 0 and ends every rank with 143; resuming with
checkpoint.resume=auto then continues bitwise like the uninterrupted run (w2_straight).

Ranks are started as two processes with torchrun's variables (so the test holds their pids and can
`kill` one or all), through _preempt_main.py, which maps Preempted to its exit code until the CLI
does. Every run passes train.device=cpu (ckpt_helpers.TINY).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckpt_helpers as H
from _dist import free_port
from moetrain.checkpoint import store
from moetrain.config import ConfigError
from _preempt_main import TEST_ENV
from moetrain.train.preempt import DEFAULT_SIGNALS, configured_signals, parse_signals

WRAPPER = Path(__file__).with_name("_preempt_main.py")
STEPS = 20
# w2_straight's run (checkpoint.every does not change the losses), saving only when preempted
W2 = ["parallel.ep=2", f"train.steps={STEPS}", "checkpoint.every=1000", "checkpoint.keep_last=10"] + H.STATEFUL
W1 = ["train.steps=6", "checkpoint.every=1000"]
SIGTERM_EXIT = 128 + signal.SIGTERM       # 143


def start(tmp: Path, extra: list[str], world: int, **env: str) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = H.cli_env(**env)
        if world > 1:
            e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(WRAPPER), "--config", "configs/tiny_cpu.yaml",
               *H.overrides(tmp / "runs", tmp / "ckpt", extra)]
        procs.append(subprocess.Popen(cmd, cwd=H.REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def run(tmp: Path, extra: list[str], world: int, **env: str) -> list[tuple[int, str, str]]:
    return H.run_many(start(tmp, extra, world, **env), timeout_s=180)


def preempted_lines(results) -> list[str]:
    return [line for _, out, err in results for line in (out + err).splitlines() if "preempted by" in line]


def checkpoints(tmp: Path) -> list[int]:
    return [c.step for c in store.find_complete(str(tmp / "ckpt"))[0]]


def resume_and_compare(tmp: Path, ref: dict, stopped_at: int) -> None:
    results = run(tmp, W2 + ["checkpoint.resume=auto"], 2)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert f"resumed from {tmp / 'ckpt' / store.step_dirname(stopped_at)} at step {stopped_at}" in results[0][1]
    got = H.losses(tmp / "runs")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]     # bitwise
    assert checkpoints(tmp) == [STEPS, stopped_at]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_saves_and_resumes_exactly(w2_straight, tmp_path):
    """`kill -TERM` of rank 1 alone (here: rank 1 signals itself at the top of step 7): both ranks
    agree, finish step 8, save step_00000008, exit 143; the resumed run equals the straight one."""
    ref, _ = w2_straight
    results = run(tmp_path, W2, 2, **{TEST_ENV: "rank=1,step=7,sig=TERM"})
    detail = "\n".join(err[-3000:] for _, _, err in results)
    assert [code for code, _, _ in results] == [SIGTERM_EXIT] * 2, detail
    assert preempted_lines(results) == [
        f"moetrain: preempted by SIGTERM at step 8: checkpoint step_00000008 saved in {tmp_path / 'ckpt'}; "
        "resume with checkpoint.resume=auto"], detail
    assert preempted_lines(results)[0] in results[0][1]           # rank 0, stdout
    assert "Traceback" not in detail
    assert checkpoints(tmp_path) == [8]
    got = H.losses(tmp_path / "runs")
    assert [got[s] for s in sorted(got)] == [ref[s] for s in range(1, 9)] and sorted(got) == list(range(1, 9))
    resume_and_compare(tmp_path, ref, 8)


@pytest.mark.slow
def test_sigterm_from_outside_to_every_rank_twice(w2_straight, tmp_path):
    """Slurm-like: every rank gets SIGTERM at an arbitrary point of a step (maybe inside a gloo
    collective), twice in a row (a launcher forwarding what the process group already got). The
    second is ignored; the stop step is whatever step was running; resuming is exact."""
    ref, _ = w2_straight
    procs = start(tmp_path, W2, 2)
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:      # handlers installed
            break
        time.sleep(0.005)
    for _ in range(2):
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
    results = H.run_many(procs, timeout_s=180)
    detail = "\n".join(err[-3000:] for _, _, err in results)
    assert [code for code, _, _ in results] == [SIGTERM_EXIT] * 2, detail
    stopped, = checkpoints(tmp_path)
    assert 2 <= stopped < STEPS
    assert preempted_lines(results) == [
        f"moetrain: preempted by SIGTERM at step {stopped}: checkpoint {store.step_dirname(stopped)} saved in "
        f"{tmp_path / 'ckpt'}; resume with checkpoint.resume=auto"], detail
    got = H.losses(tmp_path / "runs")
    assert sorted(got) == list(range(1, stopped + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in range(1, stopped + 1)]
    resume_and_compare(tmp_path, ref, stopped)


def test_checkpointing_off_stops_and_says_nothing_was_saved(tmp_path):
    (code, out, err), = run(tmp_path, ["train.steps=6", "checkpoint.every=0"], 1, **{TEST_ENV: "rank=0,step=2"})
    assert code == SIGTERM_EXIT, err[-3000:]
    assert preempted_lines([(code, out, err)]) == [
        "moetrain: preempted by SIGTERM at step 3: checkpointing is off (checkpoint.every=0), nothing was saved; "
        "set checkpoint.every to make a preemption resumable"]
    assert sorted(H.losses(tmp_path / "runs")) == [1, 2, 3]
    assert not (tmp_path / "ckpt").exists()


def test_signals_while_saving_are_ignored_and_the_async_save_commits(tmp_path):
    """SIGUSR1 stops the run (exit 138); two SIGTERMs that arrive while the checkpoint is written
    (async) neither abort the save nor change the outcome."""
    (code, out, err), = run(tmp_path, W1 + ["checkpoint.async_save=true"], 1,
                            **{TEST_ENV: "rank=0,step=2,sig=USR1", "PREEMPT_TEST_SIGNALS_IN_SAVE": "2"})
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert preempted_lines([(code, out, err)]) == [
        f"moetrain: preempted by SIGUSR1 at step 3: checkpoint step_00000003 saved in {tmp_path / 'ckpt'}; "
        "resume with checkpoint.resume=auto"]
    assert checkpoints(tmp_path) == [3]
    store.check_contents(store.find_complete(str(tmp_path / "ckpt"))[0][0])       # every CRC


def test_signal_during_the_last_step_finishes_normally(tmp_path):
    (code, out, err), = run(tmp_path, W1, 1, **{TEST_ENV: "rank=0,step=5"})
    assert code == 0, err[-3000:]
    assert "moetrain: SIGTERM during the last step: finishing normally" in out
    assert not preempted_lines([(code, out, err)])
    assert checkpoints(tmp_path) == [6]


def test_exit_signals_disabled_leaves_the_default_action(tmp_path):
    """train.exit_signals=[]: no handler, a SIGTERM ends the process as it always did."""
    (code, out, err), = run(tmp_path, W1 + ["train.exit_signals=[]"], 1, **{TEST_ENV: "rank=0,step=2"})
    assert code == -signal.SIGTERM, err[-3000:]
    assert not (tmp_path / "ckpt").exists() or checkpoints(tmp_path) == []


# ------------------------------------------------------------------ configuration, no training

@pytest.mark.parametrize("spec,expected", [
    ("TERM,USR1", (signal.SIGTERM, signal.SIGUSR1)),
    ("sigterm usr1 SIGTERM", (signal.SIGTERM, signal.SIGUSR1)),
    ("15, INT", (signal.SIGTERM, signal.SIGINT)),
    (["SIGUSR2"], (signal.SIGUSR2,)),
    ("", ()), ("none", ()), ([], ()),
])
def test_parse_signals(spec, expected):
    assert parse_signals(spec) == tuple(int(s) for s in expected)


@pytest.mark.parametrize("spec,words", [("KILL", "cannot be caught"), ("SIGSTOP", "cannot be caught"),
                                        ("TREM", "no such signal"), ("999", "no such signal number")])
def test_parse_signals_refuses(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_signals(spec)


def test_configured_signals_from_the_config(tmp_path):
    cfg = H.make_cfg(tmp_path, tmp_path)
    assert configured_signals(cfg) == parse_signals(DEFAULT_SIGNALS) == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ConfigError, match=r"train.exit_signals=\['KILL'\] is not allowed: exit signal 'KILL': "
                                          "SIGKILL cannot be caught"):
        H.make_cfg(tmp_path, tmp_path, ["train.exit_signals=[KILL]"])