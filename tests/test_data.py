"""Tests for moetrain.data and tools/prepare_data.py (fast; fake stdlib trees under tmp_path)."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain import data
from moetrain.data import (DataError, TokenData, build_stdlib_corpus, byte_tokenize, eval_batches,
                           load_token_data, sample_batch, write_token_dir)

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "tools" / "prepare_data.py"


def make_fake_stdlib(root: Path, num_files: int = 120) -> Path:
    """A small tree shaped like a stdlib, with the directories the corpus must skip."""
    for i in range(num_files):
        sub = root / f"pkg{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# module {i}\nx = {i}\n" * (1 + i % 5))
    for skipped in ("site-packages", "dist-packages", "pkg0/__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "skipme.py").write_text("SKIPPED = True\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def write_dir(path: Path, vocab: int = 256, n_train: int = 1000, n_val: int = 200) -> Path:
    rng = np.random.default_rng(0)
    write_token_dir(path, rng.integers(0, vocab, n_train), rng.integers(0, vocab, n_val), vocab)
    return path


# ----------------------------------------------------------------------------- batching

def test_sample_batch_deterministic_and_shaped():
    tokens = np.arange(5000, dtype=np.uint16)
    a = sample_batch(tokens, seed=1, step=3, batch_size=4, seq_len=16)
    assert a.shape == (4, 17) and a.dtype == torch.int64
    assert torch.equal(a, sample_batch(tokens, seed=1, step=3, batch_size=4, seq_len=16))
    assert not torch.equal(a, sample_batch(tokens, seed=1, step=4, batch_size=4, seq_len=16))
    assert not torch.equal(a, sample_batch(tokens, seed=2, step=3, batch_size=4, seq_len=16))
    # windows are contiguous slices of the data
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.int64))


def test_sample_batch_covers_both_ends():
    tokens = np.arange(10, dtype=np.uint8)
    starts = {int(sample_batch(tokens, 0, s, 8, 8)[i, 0]) for s in range(50) for i in range(8)}
    assert starts == {0, 1}


def test_sample_batch_too_short_names_file(tmp_path):
    d = write_dir(tmp_path / "tok", n_train=10, n_val=5)
    td = load_token_data("memmap", str(d), 256)
    with pytest.raises(DataError, match=r"val\.bin.*fewer than seq_len\+1"):
        sample_batch(td.val, 0, 0, 2, 5)
    with pytest.raises(DataError, match=r"train\.bin"):
        eval_batches(td.train, 1, 2, 10)


def test_eval_batches_deterministic_and_spread():
    tokens = np.arange(1000, dtype=np.uint16)
    a = eval_batches(tokens, num_batches=3, batch_size=2, seq_len=9)
    b = eval_batches(tokens, num_batches=3, batch_size=2, seq_len=9)
    assert len(a) == 3 and all(t.shape == (2, 10) and t.dtype == torch.int64 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    firsts = torch.cat([t[:, 0] for t in a])
    assert firsts[0] == 0 and firsts[-1] == 1000 - 10
    # more windows than distinct starts: repeats instead of failing
    assert len(eval_batches(np.arange(12, dtype=np.uint8), 4, 4, 10)) == 4


def test_byte_tokenize():
    t = byte_tokenize(b"ab\x00\xff")
    assert t.dtype == np.uint8 and t.tolist() == [97, 98, 0, 255]


# ----------------------------------------------------------------------------- token dirs

@pytest.mark.parametrize("vocab,dtype", [(256, np.uint8), (100, np.uint8), (1000, np.uint16)])
def test_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(1)
    train, val = rng.integers(0, vocab, 777), rng.integers(0, vocab, 55)
    write_token_dir(tmp_path / "tok", train, val, vocab, meta_extra={"note": "x"})
    td = load_token_data("memmap", str(tmp_path / "tok"), vocab_size=vocab)
    assert isinstance(td, TokenData) and td.vocab_size == vocab
    assert isinstance(td.train, np.memmap) and td.train.dtype == dtype
    np.testing.assert_array_equal(td.train, train)
    np.testing.assert_array_equal(td.val, val)
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["note"] == "x" and meta["num_train_tokens"] == 777
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temp dirs left behind


def test_write_replaces_existing_but_refuses_foreign_dir(tmp_path):
    d = write_dir(tmp_path / "tok", n_train=100)
    write_dir(d, n_train=300)
    assert load_token_data("memmap", str(d), 256).train.size == 300
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not a token directory"):
        write_dir(foreign)
    assert (foreign / "precious.txt").exists()


def _corrupt_truncate(d):
    p = d / "train.bin"
    p.write_bytes(p.read_bytes()[:-3])
    return "train.bin"


def _corrupt_missing_meta(d):
    (d / "meta.json").unlink()
    return "meta.json"


def _corrupt_bad_json(d):
    (d / "meta.json").write_text("{not json")
    return "meta.json"


def _edit_meta(d, **changes):
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))


def _corrupt_token_oob(d):
    _edit_meta(d, vocab_size=100)  # file holds bytes up to 255
    return "train.bin"


def _corrupt_version(d):
    _edit_meta(d, format_version=99)
    return "meta.json"


def _corrupt_dtype(d):
    _edit_meta(d, dtype="uint16")
    return "meta.json"


def _corrupt_empty_val(d):
    (d / "val.bin").write_bytes(b"")
    _edit_meta(d, num_val_tokens=0)
    return "val.bin"


def _corrupt_missing_bin(d):
    (d / "val.bin").unlink()
    return "val.bin"


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_missing_meta, _corrupt_bad_json,
                                     _corrupt_token_oob, _corrupt_version, _corrupt_dtype,
                                     _corrupt_empty_val, _corrupt_missing_bin])
def test_corruption_raises_one_line_naming_file(tmp_path, corrupt):
    d = write_dir(tmp_path / "tok")
    fname = corrupt(d)
    with pytest.raises(DataError) as info:
        load_token_data("memmap", str(d), vocab_size=256)
    msg = str(info.value)
    assert str(d / fname) in msg and "\n" not in msg


def test_vocab_mismatch_message(tmp_path):
    d = write_dir(tmp_path / "tok", vocab=1000)
    with pytest.raises(DataError, match="data has vocab 1000 but model.vocab_size is 256"):
        load_token_data("memmap", str(d), vocab_size=256)


def test_bad_source_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="data.path is required"):
        load_token_data("memmap", None, 256)
    with pytest.raises(DataError, match="unknown"):
        load_token_data("parquet", None, 256)
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_token_data("memmap", str(tmp_path / "nope"), 256)


# ----------------------------------------------------------------------------- corpus cache

def test_fake_stdlib_corpus(tmp_path):
    root = make_fake_stdlib(tmp_path / "lib")
    out = Path(data._build_corpus(root, str(tmp_path / "cache")))
    assert out.parent == tmp_path / "cache" and out.name.startswith("stdlib-py3.")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_files"] == 120 and meta["vocab_size"] == 256
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("pkg*/*.py"))
    val_files = [f for f in sorted(files) if zlib.crc32(f.encode()) % 100 < 2]
    assert meta["num_val_files"] == len(val_files) > 0
    train = np.fromfile(out / "train.bin", dtype=np.uint8)
    assert b"SKIPPED" not in train.tobytes() and train.tobytes().count(b"\x00") == 120 - len(val_files)
    # cached: same dir, not rebuilt
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert Path(data._build_corpus(root, str(tmp_path / "cache"))) == out
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    # a changed file list gets a new cache dir
    (root / "pkg1" / "new.py").write_text("y = 1\n")
    assert Path(data._build_corpus(root, str(tmp_path / "cache"))) != out


def _build_worker(root, cache, barrier, queue):
    barrier.wait()
    queue.put(data._build_corpus(Path(root), cache))


def test_concurrent_builds_publish_one_valid_dir(tmp_path):
    root, cache = make_fake_stdlib(tmp_path / "lib", 400), str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build_worker, args=(str(root), cache, barrier, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    assert [p.name for p in Path(cache).iterdir()] == [Path(results[0]).name]  # no temp leftovers
    td = data._load_token_dir(Path(results[0]), 256)
    assert td[0].size > 0 and td[1].size > 0


def test_losing_the_race_uses_winner(tmp_path, monkeypatch):
    root, cache = make_fake_stdlib(tmp_path / "lib"), tmp_path / "cache"
    winner = Path(data._build_corpus(root, str(cache)))
    real_is_file = Path.is_file
    seen = []

    def pretend_missing_once(self):  # the first existence check misses, as if the winner were slower
        if self.name == "meta.json" and not seen:
            seen.append(self)
            return False
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", pretend_missing_once)
    assert Path(data._build_corpus(root, str(cache))) == winner
    assert sorted(p.name for p in cache.iterdir()) == [winner.name]


def test_real_stdlib_corpus(tmp_path):
    td = load_token_data("stdlib", None, vocab_size=256, cache_dir=str(tmp_path))
    assert td.source.startswith("stdlib:") and td.train.dtype == np.uint8
    assert td.train.size > 1_000_000 and td.val.size > 10_000
    assert td.train.size > 20 * td.val.size
    assert build_stdlib_corpus(str(tmp_path)) == str(Path(td.train.filename).parent)
    assert sample_batch(td.train, 0, 0, 2, 64).shape == (2, 65)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "envcache"))
    out = data._build_corpus(make_fake_stdlib(tmp_path / "lib"), None)
    assert Path(out).parent == tmp_path / "envcache"


# ----------------------------------------------------------------------------- prepare_data CLI

def run_prepare(*args):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_prepare_data_dir_by_file(tmp_path):
    src = tmp_path / "src"
    for i in range(200):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.txt").write_text(f"doc {i}\n" * 3)
    (src / "skip.md").write_text("not matched")
    r = run_prepare("--out", tmp_path / "out", "--glob", "*.txt", src)
    assert r.returncode == 0, r.stderr
    td = load_token_data("memmap", str(tmp_path / "out"), 256)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["split"] == "by_file" and meta["num_files"] == 200 and meta["tokenizer"] == "bytes"
    assert b"not matched" not in td.train.tobytes() + td.val.tobytes()
    assert td.train.size + td.val.size == sum(len(f"doc {i}\n" * 3) + 1 for i in range(200))


def test_prepare_data_single_file_tail_split(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(b"x" * 999)
    r = run_prepare("--out", tmp_path / "out", "--val-frac", "0.1", f)
    assert r.returncode == 0, r.stderr
    td = load_token_data("memmap", str(tmp_path / "out"), 256)
    assert (td.train.size, td.val.size) == (900, 100) and td.val[-1] == 0


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_file", "vocab_too_small", "bad_frac"])
def test_prepare_data_bad_input_exits_2(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "text.txt").write_text("hello")
    args = {"missing": [tmp_path / "nope.txt"], "empty_dir": [tmp_path / "empty"],
            "empty_file": [tmp_path / "empty.txt"],
            "vocab_too_small": ["--vocab", "50", tmp_path / "text.txt"],
            "bad_frac": ["--val-frac", "1.5", tmp_path / "text.txt"]}[case]
    r = run_prepare("--out", tmp_path / "out", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip()
    if case != "bad_frac":
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
