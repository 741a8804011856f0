"""Output paths longer than the filesystem allows (issue 15): a 300-character logging.run_name
used to end in a traceback after the model was built, a too-long checkpoint.dir only at the first
save. check_output_dirs now refuses both at start-up with one line naming the key."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import (ConfigError, _longest_checkpoint_file, _longest_run_file, check_output_dirs,
                             load_config)

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def output_error(overrides, world_size: int = 1) -> str:
    cfg = load_config(TINY, list(overrides))
    with pytest.raises(ConfigError) as info:
        check_output_dirs(cfg, world_size)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def name_max(path) -> int:
    return os.pathconf(path, "PC_NAME_MAX")


def path_max(path) -> int:
    return os.pathconf(path, "PC_PATH_MAX")


def long_dir(base: Path, total: int) -> str:
    """A path under base of exactly `total` bytes, in components of at most 200 bytes."""
    path = str(base)
    while len(path) < total:
        room = total - len(path) - 1
        path += "/" + "d" * min(200, room if room <= 200 or room - 200 > 1 else 100)
    assert len(path) == total, (len(path), total)
    return path


def test_long_run_name_is_refused(tmp_path):
    msg = output_error([f"logging.dir={tmp_path}", "logging.run_name=" + "r" * 300])
    assert msg.startswith("logging.run_name='rrrr") and "(300 characters)" in msg, msg
    assert f"over the {name_max(tmp_path)} bytes a file name may have" in msg and "NAME_MAX" in msg, msg
    assert os.listdir(tmp_path) == []


def test_long_component_in_logging_dir_names_logging_dir(tmp_path):
    msg = output_error([f"logging.dir={tmp_path / ('x' * 256) / 'runs'}"])
    assert msg.startswith("logging.dir=") and "NAME_MAX" in msg, msg


def test_run_name_at_the_name_limit_passes(tmp_path):
    check_output_dirs(load_config(TINY, [f"logging.dir={tmp_path}", "logging.run_name=" + "r" * name_max(tmp_path)]))


def test_multibyte_names_count_bytes(tmp_path):
    n = name_max(tmp_path) // 2 + 1            # characters of 2 bytes each: over the byte limit
    msg = output_error([f"logging.dir={tmp_path}", "logging.run_name=" + "é" * n])
    assert "NAME_MAX" in msg, msg


@pytest.mark.parametrize("world", [1, 64])
def test_checkpoint_dir_too_long_for_the_files_inside(tmp_path, world):
    """At exactly PATH_MAX - 1 bytes for checkpoint.dir/<longest name inside> it fits; one more
    byte and it is refused at start-up, naming checkpoint.dir and the name that would not fit."""
    base = ["checkpoint.every=2", f"logging.dir={tmp_path / 'runs'}"]
    cfg = load_config(TINY, base)
    inside, size = _longest_checkpoint_file(cfg, world)
    assert inside.startswith(".tmp-step_") and inside.endswith(("manifest.json.tmp", ".distcp")), inside
    assert size == len(inside)
    fits = path_max(tmp_path) - 1 - size - 1          # dir + "/" + inside == PATH_MAX - 1
    check_output_dirs(load_config(TINY, base + [f"checkpoint.dir={long_dir(tmp_path, fits)}"]), world)
    msg = output_error(base + [f"checkpoint.dir={long_dir(tmp_path, fits + 1)}"], world)
    assert msg.startswith("checkpoint.dir=") and "PATH_MAX" in msg and f"({inside}, {size} bytes)" in msg, msg
    # not saving: the directory is never created, so its length does not matter
    check_output_dirs(load_config(TINY, base[1:] + [f"checkpoint.dir={long_dir(tmp_path, fits + 1)}"]), world)


def test_logging_dir_too_long_for_tensorboard_files(tmp_path):
    cfg = load_config(TINY, ["logging.tensorboard=true"])
    inside, size = _longest_run_file(cfg, 2)
    assert inside.startswith("tb/moe_layer3_") and ".tfevents." in inside and size > 100, inside
    assert _longest_run_file(load_config(TINY, ["logging.tensorboard=false"]), 2) == ("metrics.999999.jsonl", 20)
    fits = path_max(tmp_path) - 1 - size - len("/run/")
    check_output_dirs(load_config(TINY, [f"logging.dir={long_dir(tmp_path, fits)}", "logging.run_name=run",
                                         "logging.tensorboard=true"]), 2)
    msg = output_error([f"logging.dir={long_dir(tmp_path, fits + 1)}", "logging.run_name=run",
                        "logging.tensorboard=true"], 2)
    assert msg.startswith("logging.dir=") and "logging.dir + logging.run_name" in msg and "PATH_MAX" in msg, msg


@pytest.mark.parametrize("override, key", [("logging.run_name=" + "r" * 300, "logging.run_name"),
                                           ("checkpoint.dir=LONG", "checkpoint.dir")])
def test_cli_refuses_long_paths_before_building_anything(tmp_path, override, key):
    if override == "checkpoint.dir=LONG":
        override = f"checkpoint.dir={long_dir(tmp_path, path_max(tmp_path) - 20)}"
    cmd = [sys.executable, "-m", "moetrain.train", "--config", TINY, "train.device=cpu", "train.steps=1",
           f"logging.dir={tmp_path / 'runs'}", "checkpoint.every=1", f"checkpoint.dir={tmp_path / 'ck'}", override]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moetrain: error: {key}="), p.stderr
    assert p.stdout == "", p.stdout                     # nothing was built or logged
    assert sorted(os.listdir(tmp_path)) == []
