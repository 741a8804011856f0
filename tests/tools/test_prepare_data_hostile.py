"""tools/prepare_data.py on hostile inputs: only regular files are read, and reads are bounded.

Inside a directory a FIFO, a socket, a symlink to /dev/zero and a dangling symlink are each
skipped with one warning line; a symlinked directory is not followed; a symlink to a regular file
is read. Named on the command line, a FIFO or a device is refused with one line (exit 2). A file
over --max-file-mb, or inputs over --max-total-mb, are refused with one line naming the file
(exit 2), before anything is read. Every run has a timeout: a hang fails the test instead of CI.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moetrain.data import load_token_data

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "tools" / "prepare_data.py"
TIMEOUT_S = 60      # the old tool blocked forever on a FIFO and read /dev/zero until MemoryError


def run_prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _texts(src: Path, n: int = 3) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (src / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    return src


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("prepare_data: warning: ")]


def _tokens(out: Path) -> int:
    td = load_token_data("memmap", str(out), 256)
    return td.train.size + td.val.size


def _expected_tokens(src: Path, n: int = 3) -> int:
    return sum(len((src / f"doc{i}.txt").read_bytes()) + 1 for i in range(n))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_in_directory_is_skipped_not_hung(tmp_path):
    src = _texts(tmp_path / "src")
    os.mkfifo(src / "pipe.txt")          # matches the glob; nobody ever writes to it
    r = run_prepare("--out", tmp_path / "out", "--glob", "*.txt", src)
    assert r.returncode == 0, r.stderr
    assert _warnings(r.stderr) == [f"prepare_data: warning: skipping {src / 'pipe.txt'}: a FIFO, not a regular file"]
    assert _tokens(tmp_path / "out") == _expected_tokens(src)


def test_symlink_to_dev_zero_is_skipped(tmp_path):
    src = _texts(tmp_path / "src")
    (src / "zeros.txt").symlink_to("/dev/zero")
    r = run_prepare("--out", tmp_path / "out", src)
    assert r.returncode == 0, r.stderr
    warn, = _warnings(r.stderr)
    assert str(src / "zeros.txt") in warn and "character device" in warn and "symlink" in warn
    assert _tokens(tmp_path / "out") == _expected_tokens(src)


def test_socket_dangling_link_and_linked_dir_are_skipped_linked_file_is_read(tmp_path):
    src = _texts(tmp_path / "src")
    (src / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (src / "linked_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _texts(tmp_path / "elsewhere", 1)
    (tmp_path / "outside.txt").write_text("outside\n")
    (src / "via_link.txt").symlink_to(tmp_path / "outside.txt")
    # AF_UNIX paths are limited to ~108 bytes: bind in a short directory, then move the socket in
    short = tempfile.mkdtemp(prefix="pd", dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(short, "s"))
            os.rename(os.path.join(short, "s"), src / "sock.txt")
            r = run_prepare("--out", tmp_path / "out", src)
    finally:
        os.rmdir(short)
    assert r.returncode == 0, r.stderr
    warns = _warnings(r.stderr)
    assert len(warns) == 3, r.stderr
    assert any("dangling.txt: dangling symlink" in w for w in warns)
    assert any("linked_dir: symlinked directory (not followed)" in w for w in warns)
    assert any("sock.txt: a socket" in w for w in warns)
    assert _tokens(tmp_path / "out") == _expected_tokens(src) + len("outside\n") + 1


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "/dev/null"])
def test_named_non_regular_input_is_refused(tmp_path, target):
    if target == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    r = run_prepare("--out", tmp_path / "out", target)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert str(target) in r.stderr and "not a regular file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_file_over_the_per_file_limit_is_refused_before_reading(tmp_path):
    src = _texts(tmp_path / "src")
    with open(src / "huge.txt", "wb") as f:      # sparse: 3 MiB apparent size, nothing written
        f.truncate(3 << 20)
    r = run_prepare("--out", tmp_path / "out", "--max-file-mb", "2", src)
    assert r.returncode == 2
    line, = r.stderr.strip().splitlines()
    assert line == (f"prepare_data: error: {src / 'huge.txt'}: 3.0 MiB, over the --max-file-mb limit (2.0 MiB); "
                    "raise the limit or leave the file out")
    assert not (tmp_path / "out").exists()
    assert run_prepare("--out", tmp_path / "out", "--max-file-mb", "4", src).returncode == 0


def test_inputs_over_the_total_limit_are_refused(tmp_path):
    src = _texts(tmp_path / "src", 3)          # 3 x 240 bytes
    r = run_prepare("--out", tmp_path / "out", "--max-total-mb", str(500 / (1 << 20)), src)
    assert r.returncode == 2
    line, = r.stderr.strip().splitlines()
    assert "--max-total-mb limit (500 bytes)" in line and str(src / "doc2.txt") in line, line
    assert not (tmp_path / "out").exists()


def test_size_zero_regular_file_that_is_not_is_bounded_while_reading(tmp_path):
    """/proc files are regular and report size 0: the limit holds while reading too."""
    proc = Path("/proc/self/maps")
    if not proc.is_file():
        pytest.skip("no /proc")
    r = run_prepare("--out", tmp_path / "out", "--max-file-mb", str(16 / (1 << 20)), proc)
    assert r.returncode == 2
    line, = r.stderr.strip().splitlines()
    assert "/proc/self/maps: over the --max-file-mb limit (16 bytes) when read" in line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_limit_flags_must_be_positive(tmp_path, value):
    r = run_prepare("--out", tmp_path / "out", "--max-file-mb", value, tmp_path)
    assert r.returncode == 2 and "--max-file-mb must be a positive number" in r.stderr
