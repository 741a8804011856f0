"""tools/prepare_data.py's input formats, tokenizers and uint32 token files (moetrain/data_formats.py,
moetrain/tokenizer.py).

Each format is written here from its documented layout (JSON Lines by hand, nanoGPT and Megatron-LM
binaries with numpy/struct; Parquet with pyarrow, the format's reference writer), read back through
prepare_data and compared token for token, following the split rule prepare_data documents. Every
bad file is exit 2 with one line naming the file, and nothing written. A small BPE tokenizer trained
here with the `tokenizers` trainer prepares data that a tiny model then trains on (world 1, CPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from moetrain.data import DataError, load_token_data, write_token_dir
from moetrain.tokenizer import ByteCodec, HFCodec, TokenizerError, load_codec
from _tools import load_tool

REPO = Path(__file__).resolve().parents[2]
prepare_data = load_tool("prepare_data")

MAGIC = b"MMIDIDX\x00\x00"
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def prepare(capsys, *args) -> tuple[int, str]:
    """Run prepare_data in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = prepare_data.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def tokens_of(out: Path, vocab: int) -> tuple[np.ndarray, np.ndarray, dict]:
    td = load_token_data("memmap", str(out), vocab)
    return np.asarray(td.train), np.asarray(td.val), json.loads((out / "meta.json").read_text())


def expected_split(docs: list[tuple[str, list[int]]], val_frac: float = 0.02):
    """prepare_data's documented split: by crc32(key) when both sides are non-empty, else the tail."""
    thr = round(val_frac * 10000)
    is_val = [zlib.crc32(k.encode()) % 10000 < thr for k, _ in docs]
    if len(docs) > 1 and 0 < sum(is_val) < len(docs):
        return ([t for (_, d), v in zip(docs, is_val) if not v for t in d],
                [t for (_, d), v in zip(docs, is_val) if v for t in d])
    stream = [t for _, d in docs for t in d]
    n_val = min(len(stream) - 1, max(1, round(len(stream) * val_frac)))
    return stream[:-n_val], stream[-n_val:]


def assert_one_error_line(rc: int, err: str, *needles) -> None:
    assert rc == 2, err
    line, = err.strip().splitlines()
    assert line.startswith("prepare_data: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in line, line


# ----------------------------------------------------------------------------- writers (by hand)


def write_megatron(prefix: Path, docs: list[list[list[int]]], dtype=np.int32, order=None,
                   modes: bool = False) -> None:
    """Megatron-LM's MMapIndexedDataset from its documented layout: docs = [[sequence, ...], ...].
    ``order`` permutes where the sequences sit in .bin (pointers then are not contiguous)."""
    seqs = [s for d in docs for s in d]
    itemsize = np.dtype(dtype).itemsize
    order = list(range(len(seqs))) if order is None else order
    pointers, blob, pos = [0] * len(seqs), b"", 0
    for i in order:
        pointers[i] = pos
        data = np.asarray(seqs[i], dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        blob += data
        pos += len(data)
    doc_idx = [0]
    for d in docs:
        doc_idx.append(doc_idx[-1] + len(d))
    idx = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype])
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(seqs)}i", *[len(s) for s in seqs])
    idx += struct.pack(f"<{len(seqs)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    if modes:
        idx += bytes(len(seqs))
    Path(f"{prefix}.idx").write_bytes(idx)
    Path(f"{prefix}.bin").write_bytes(blob)
    assert itemsize * sum(map(len, seqs)) == len(blob)


def random_docs(rng, n_docs: int, vocab: int, max_len: int = 40) -> list[list[int]]:
    return [rng.integers(1, vocab, rng.integers(1, max_len)).tolist() for _ in range(n_docs)]


# ----------------------------------------------------------------------------- formats round trip


def test_jsonl_round_trip_bytes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    texts = [f"doc {i} " + "é" * int(rng.integers(0, 5)) + "x" * int(rng.integers(1, 50)) for i in range(300)]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    lines.insert(7, "")                                   # a blank line is skipped (but keeps its index)
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = prepare(capsys, "--out", tmp_path / "out", tmp_path / "c.jsonl")
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", 256)
    # key = FILE#LINE_INDEX, the 0-based line index: records after the blank line are one further on
    exp_train, exp_val = expected_split([(f"c.jsonl#{i + (i >= 7)}", [*t.encode(), 0]) for i, t in enumerate(texts)])
    assert train.tolist() == exp_train and val.tolist() == exp_val and len(exp_val) > 0
    assert meta["format"] == "jsonl" and meta["split"] == "by_document" and meta["num_documents"] == 300
    assert meta["tokenizer"] == "bytes" and meta["eod_id"] == 0


def test_parquet_round_trip_other_field(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}: " + "abc" * (i % 7) for i in range(250)]
    pq.write_table(pa.table({"body": texts + [None], "n": list(range(251))}), tmp_path / "c.parquet",
                   row_group_size=64)
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--field", "body", tmp_path / "c.parquet")
    assert rc == 0, err
    assert "skipped 1 row(s) whose 'body' is null" in err
    train, val, meta = tokens_of(tmp_path / "out", 256)
    exp_train, exp_val = expected_split([(f"c.parquet#{i}", [*t.encode(), 0]) for i, t in enumerate(texts)])
    assert train.tolist() == exp_train and val.tolist() == exp_val
    assert meta["format"] == "parquet" and meta["field"] == "body"


def test_nanogpt_train_val_pair_keeps_its_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "shakespeare"
    src.mkdir()
    train, val = rng.integers(0, 50257, 5000).astype(np.uint16), rng.integers(0, 50257, 600).astype(np.uint16)
    train.tofile(src / "train.bin")                      # nanoGPT's prepare.py: np.uint16 .tofile()
    val.tofile(src / "val.bin")
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--format", "nanogpt", "--dtype", "uint16",
                      "--vocab", 50257, src)
    assert rc == 0, err
    got_train, got_val, meta = tokens_of(tmp_path / "out", 50257)
    assert got_train.dtype == np.uint16 and np.array_equal(got_train, train) and np.array_equal(got_val, val)
    assert meta["split"] == "train_val_files" and meta["tokenizer"] == "none" and meta["eod_id"] is None
    with pytest.raises(TokenizerError, match="no tokenizer recorded"):
        load_codec(tmp_path / "out")


def test_nanogpt_single_uint32_file_tail_split_loads_as_uint32(tmp_path, capsys):
    """uint32: a vocabulary over 65536 ids is stored and loaded as uint32."""
    vocab = 100_000
    tokens = np.random.default_rng(2).integers(0, vocab, 3001).astype("<u4")
    tokens[5] = vocab - 1
    tokens.tofile(tmp_path / "corpus.bin")
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--dtype", "uint32", "--vocab", vocab,
                      "--val-frac", "0.1", tmp_path / "corpus.bin")     # .bin without .idx: nanogpt
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", vocab)
    assert meta["dtype"] == "uint32" and meta["format"] == "nanogpt" and meta["split"] == "tail_tokens"
    assert train.dtype == np.uint32 and np.array_equal(np.concatenate([train, val]), tokens)
    assert val.size == 300
    with pytest.raises(DataError, match=f"data has vocab {vocab} but model.vocab_size is 65536"):
        load_token_data("memmap", str(tmp_path / "out"), 65536)


def test_uint32_token_dir_round_trip(tmp_path):
    vocab = 70_000
    train = np.array([0, 65535, 65536, 69_999, 12], dtype=np.int64)
    write_token_dir(tmp_path / "tok", train, train[::-1], vocab)
    td = load_token_data("memmap", str(tmp_path / "tok"), vocab)
    assert td.train.dtype == np.uint32 and td.train.tolist() == train.tolist()
    assert (tmp_path / "tok" / "train.bin").stat().st_size == 4 * train.size
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    meta["vocab_size"] = 65_536                              # an id over the recorded vocab is found
    meta["dtype"] = "uint16"
    (tmp_path / "tok" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="size 20 bytes"):
        load_token_data("memmap", str(tmp_path / "tok"), vocab)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_megatron_round_trip_with_eod(tmp_path, capsys, dtype):
    rng = np.random.default_rng(3)
    # each document: 1-3 sequences (Megatron splits a document into sentences or keeps one)
    docs = [[rng.integers(1, 1000, rng.integers(1, 30)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(200)]
    docs[3][-1].append(0)                                  # already ends with the eod: not doubled
    write_megatron(tmp_path / "corpus_text_document", docs, dtype)
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--eod-id", 0, "--vocab", 1000,
                      tmp_path / "corpus_text_document.idx")
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", 1000)
    flat = []
    for i, d in enumerate(docs):
        toks = [t for s in d for t in s]
        flat.append((f"corpus_text_document#{i}", toks if toks[-1] == 0 else toks + [0]))
    exp_train, exp_val = expected_split(flat)
    assert train.tolist() == exp_train and val.tolist() == exp_val and len(exp_val) > 0
    assert meta["format"] == "megatron" and meta["eod_id"] == 0 and meta["num_documents"] == 200


def test_megatron_scattered_pointers_modes_and_no_eod(tmp_path, capsys):
    """Sequences stored out of order in .bin (pointers not contiguous) and a multimodal modes array;
    without --eod-id documents are concatenated as stored. The prefix alone names the dataset."""
    rng = np.random.default_rng(4)
    docs = [[random_docs(rng, 1, 500)[0], random_docs(rng, 1, 500)[0]] for _ in range(3)]
    write_megatron(tmp_path / "ds", docs, np.int32, order=[5, 0, 3, 1, 4, 2], modes=True)
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--vocab", 500, "--val-frac", "0.3", tmp_path / "ds")
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", 500)
    exp_train, exp_val = expected_split([(f"ds#{i}", [t for s in d for t in s]) for i, d in enumerate(docs)], 0.3)
    assert train.tolist() == exp_train and val.tolist() == exp_val
    assert meta["eod_id"] is None


def test_format_detection_refuses_a_mix(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.txt").write_text("y")
    rc, err = prepare(capsys, "--out", tmp_path / "out", tmp_path / "a.jsonl", tmp_path / "b.txt")
    assert_one_error_line(rc, err, "inputs mix formats", "--format")


# ----------------------------------------------------------------------------- bad files


def _bad_jsonl(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    return [tmp / "bad.jsonl"], "bad.jsonl: line 2: invalid JSON"


def _jsonl_missing_field(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    return [tmp / "bad.jsonl"], "bad.jsonl: line 2: no field 'text' (fields: content)"


def _jsonl_not_string(tmp):
    (tmp / "bad.jsonl").write_text('{"text": 5}\n')
    return [tmp / "bad.jsonl"], "bad.jsonl: line 1: field 'text' is int, not a string"


def _jsonl_too_deep(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    return [tmp / "bad.jsonl"], "bad.jsonl: line 2: invalid JSON (nested too deeply)"


def _jsonl_huge_int(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "ok", "n": ' + "9" * 5000 + "}\n")
    return [tmp / "bad.jsonl"], "bad.jsonl: line 1: invalid JSON"


def _parquet_empty(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp / "bad.parquet")
    return [tmp / "bad.parquet"], "bad.parquet: empty Parquet file (0 rows)"


def _parquet_missing_field(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp / "bad.parquet")
    return [tmp / "bad.parquet"], "bad.parquet: no column 'text' (columns: content)"


def _parquet_not_parquet(tmp):
    (tmp / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    return [tmp / "bad.parquet"], "bad.parquet: not a readable Parquet file"


def _nanogpt_odd_size(tmp):
    (tmp / "bad.bin").write_bytes(bytes(7))
    return ["--dtype", "uint16", "--vocab", 256, tmp / "bad.bin"], "bad.bin: 7 bytes is not a multiple of 2"


def _nanogpt_wrong_dtype(tmp):
    np.arange(1, 101, dtype=np.uint16).tofile(tmp / "bad.bin")   # uint16 ids read as uint32
    return ["--dtype", "uint32", "--vocab", 50257, tmp / "bad.bin"], "bad.bin: token id 131073 at position 0"


def _megatron(tmp, docs=((1, 2, 3), (4, 5)), dtype=np.int32):
    write_megatron(tmp / "bad", [[list(d)] for d in docs], dtype)
    return tmp / "bad.idx", tmp / "bad.bin"


def _megatron_truncated_idx(tmp):
    idx, _ = _megatron(tmp)
    idx.write_bytes(idx.read_bytes()[:-5])
    return ["--vocab", 256, idx], "bad.idx: truncated"


def _megatron_truncated_header(tmp):
    idx, _ = _megatron(tmp)
    idx.write_bytes(idx.read_bytes()[:20])
    return ["--vocab", 256, idx], "bad.idx: truncated: 20 bytes, shorter than the 34-byte header"


def _megatron_truncated_bin(tmp):
    idx, bin_ = _megatron(tmp)
    bin_.write_bytes(bin_.read_bytes()[:-4])
    return ["--vocab", 256, idx], "bad.bin: truncated"


def _megatron_bad_magic(tmp):
    idx, _ = _megatron(tmp)
    idx.write_bytes(b"TNTIDX\x00\x00\x00" + idx.read_bytes()[9:])
    return ["--vocab", 256, idx], "bad.idx: bad magic"


def _megatron_id_over_vocab(tmp):
    idx, _ = _megatron(tmp, docs=((1, 2, 300), (4,)))
    return ["--vocab", 256, idx], "bad.bin: token id 300 at position 2 is outside the vocabulary 0..255"


def _megatron_missing_bin(tmp):
    idx, bin_ = _megatron(tmp)
    bin_.unlink()
    return ["--vocab", 256, idx], "bad.bin: no such file"


def _megatron_overlapping_sequences(tmp):
    """Many sequences all spanning the whole .bin: copying them would hold N times the .bin."""
    idx, bin_ = _megatron(tmp)
    n_tokens = bin_.stat().st_size // 4
    n = 1000
    raw = MAGIC + struct.pack("<QBQQ", 1, CODES[np.int32], n, n + 1)
    raw += struct.pack(f"<{n}i", *[n_tokens] * n) + struct.pack(f"<{n}q", *[0] * n)
    raw += struct.pack(f"<{n + 1}q", *range(n + 1))
    idx.write_bytes(raw)
    return ["--vocab", 256, idx], "bad.idx: its sequences hold"


def _megatron_pointer_overflow(tmp):
    """A pointer near 2**63: pointer + size must not wrap around to pass the bounds check."""
    idx, _ = _megatron(tmp)
    raw = bytearray(idx.read_bytes())
    struct.pack_into("<q", raw, 34 + 4 * 2 + 8, 2**63 - 4)   # the second sequence's pointer
    idx.write_bytes(bytes(raw))
    return ["--vocab", 256, idx], "bad.bin: truncated"


def _parquet_over_limit_uncompressed(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a" * 1000] * 3000}), tmp / "bad.parquet",   # ~3 MB, compresses well
                   use_dictionary=False, compression="zstd")
    assert (tmp / "bad.parquet").stat().st_size < 500_000
    return ["--max-file-mb", 1, tmp / "bad.parquet"], "bad.parquet: column 'text' is"


def _megatron_float_dtype(tmp):
    idx, _ = _megatron(tmp)
    raw = bytearray(idx.read_bytes())
    raw[17] = 7                                              # dtype code 7: float32
    idx.write_bytes(bytes(raw))
    return ["--vocab", 256, idx], "bad.idx: dtype float32 (code 7) is not an integer token type"


BAD = [_bad_jsonl, _jsonl_missing_field, _jsonl_not_string, _jsonl_too_deep, _jsonl_huge_int, _parquet_empty,
       _parquet_missing_field, _parquet_not_parquet, _parquet_over_limit_uncompressed, _nanogpt_odd_size,
       _nanogpt_wrong_dtype, _megatron_truncated_idx, _megatron_truncated_header, _megatron_truncated_bin,
       _megatron_bad_magic, _megatron_id_over_vocab, _megatron_missing_bin, _megatron_overlapping_sequences,
       _megatron_pointer_overflow, _megatron_float_dtype]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.lstrip("_") for f in BAD])
def test_bad_file_is_one_line_exit_2_nothing_written(tmp_path, capsys, make):
    """One line `prepare_data: error: FILE: what is wrong` (FILE the full path), exit 2, no output."""
    if "parquet" in make.__name__:
        pytest.importorskip("pyarrow")
    args, needle = make(tmp_path)
    rc, err = prepare(capsys, "--out", tmp_path / "out", *args)
    assert_one_error_line(rc, err, f"prepare_data: error: {tmp_path / needle}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--vocab", 256, "x.bin"], "--dtype uint16|uint32 is required for nanogpt input"),
    (["--dtype", "uint16", "x.bin"], "--vocab is required for nanogpt input without --tokenizer"),
    (["--eod-id", 0, "x.txt"], "--eod-id is for megatron input"),
    (["--dtype", "uint16", "x.txt"], "--dtype is for nanogpt input, not text"),
    (["--eod-token", "</s>", "x.txt"], "--eod-token needs --tokenizer"),
])
def test_flag_misuse_is_one_line(tmp_path, capsys, args, needle):
    (tmp_path / "x.txt").write_text("text")
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "x.bin")
    args = [tmp_path / a if str(a).startswith("x.") else a for a in args]
    assert_one_error_line(*prepare(capsys, "--out", tmp_path / "out", *args), needle)


# ----------------------------------------------------------------------------- tokenizers


def train_bpe(texts, vocab_size: int, path: Path) -> Path:
    """A byte-level BPE tokenizer trained with the `tokenizers` trainer; <|endoftext|> is id 0."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def _corpus_texts(n: int = 60) -> list[str]:
    files = sorted((REPO / "moetrain").rglob("*.py"))[:n]
    return [f.read_text() for f in files]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    return train_bpe(_corpus_texts(), 512, d / "tokenizer.json")


def test_hf_codec_round_trip_and_eod(bpe):
    codec = HFCodec.from_file(bpe)
    assert codec.kind == "hf" and codec.vocab_size == 512 and codec.eod_id == 0
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    ids = codec.encode(text)
    assert all(0 < i < 512 for i in ids) and len(ids) < len(text.encode())
    assert codec.decode(ids) == text and codec.encode_batch([text, "a"]) == [ids, codec.encode("a")]
    assert codec.decode([*ids, 0]).endswith("<|endoftext|>")
    assert ByteCodec().decode(ByteCodec().encode(text)) == text
    with pytest.raises(TokenizerError, match="not a token of this tokenizer"):
        HFCodec.from_file(bpe, eod_token="<nope>")


def test_prepare_text_with_tokenizer_copies_it_and_round_trips(tmp_path, capsys, bpe):
    src = tmp_path / "src"
    src.mkdir()
    texts = _corpus_texts(30)
    for i, t in enumerate(texts):
        (src / f"m{i:02d}.py").write_text(t)
    (src / "latin1.py").write_bytes(b"x = '\xe9'\n")                  # not UTF-8: replaced, warned
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--tokenizer", bpe, "--val-frac", "0.1", src)
    assert rc == 0, err
    assert "1 file(s) are not valid UTF-8 (first: latin1.py)" in err
    train, val, meta = tokens_of(tmp_path / "out", 512)
    assert train.dtype == np.uint16
    tok = meta["tokenizer"]
    assert tok["kind"] == "hf" and tok["file"] == "tokenizer.json" and tok["eod_id"] == 0
    assert tok["sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == bpe.read_bytes()
    codec = load_codec(tmp_path / "out")
    assert isinstance(codec, HFCodec) and codec.eod_id == 0 and codec.vocab_size == 512
    docs = [(f"m{i:02d}.py", [*codec.encode(t), 0]) for i, t in enumerate(texts) if t]   # empty: no document
    docs.append(("latin1.py", [*codec.encode("x = '\ufffd'\n"), 0]))
    docs.sort()                                                       # the directory walk's order
    exp_train, exp_val = expected_split(docs, 0.1)
    assert train.tolist() == exp_train and val.tolist() == exp_val
    assert codec.decode(val).split("<|endoftext|>")[0] in [*texts, "x = '\ufffd'\n"]   # decodes to text


def test_load_codec_refuses_a_changed_or_missing_tokenizer(tmp_path, capsys, bpe):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    assert prepare(capsys, "--out", tmp_path / "out", "--tokenizer", bpe, tmp_path / "a.txt")[0] == 0
    tok = tmp_path / "out" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|endoftext2|>"', 1))
    with pytest.raises(TokenizerError, match="sha256 .* does not match") as info:
        load_codec(tmp_path / "out")
    assert "\n" not in str(info.value)
    tok.unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read the tokenizer file"):
        load_codec(tmp_path / "out")


def test_hf_codec_ignores_stored_truncation_and_padding(tmp_path, bpe):
    """A tokenizer.json saved with truncation and padding on (as downloaded files often are):
    documents are encoded whole and batches are not padded."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer.from_file(str(bpe))
    tok.enable_truncation(max_length=3)
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>", length=64)
    tok.save(str(tmp_path / "tokenizer.json"))
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["truncation"] and saved["padding"]
    plain = HFCodec.from_file(bpe)
    codec = HFCodec.from_file(tmp_path / "tokenizer.json")
    long_text = "def f(x):\n    return x ** 2\n" * 20
    assert len(plain.encode(long_text)) > 3 and codec.encode(long_text) == plain.encode(long_text)
    assert codec.encode_batch([long_text, "a"]) == [plain.encode(long_text), plain.encode("a")]


def _token_dir_with_tokenizer(tmp_path, capsys, bpe) -> Path:
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    assert prepare(capsys, "--out", tmp_path / "out", "--tokenizer", bpe, tmp_path / "a.txt")[0] == 0
    return tmp_path / "out"


def test_load_codec_refuses_a_symlinked_or_special_tokenizer_and_deep_meta(tmp_path, capsys, bpe):
    import os
    out = _token_dir_with_tokenizer(tmp_path, capsys, bpe)
    tok = out / "tokenizer.json"
    tok.unlink()
    tok.symlink_to(bpe)                                     # even to the same content: refused
    with pytest.raises(TokenizerError, match="tokenizer.json: the tokenizer file is a symlink") as info:
        load_codec(out)
    assert "\n" not in str(info.value)
    tok.unlink()
    os.mkfifo(tok)                                          # refused, not hung
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read the tokenizer file .not a regular"):
        load_codec(out)
    (out / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TokenizerError, match="meta.json: .*nested too deeply") as info:
        load_codec(out)
    assert "\n" not in str(info.value)


def test_megatron_eod_keeps_a_narrow_dtype(tmp_path):
    write_megatron(tmp_path / "m", [[[1, 2, 3]], [[4, 5]]], np.uint16)
    files = [("m.idx", tmp_path / "m.idx", 0), ("m.bin", tmp_path / "m.bin", 0)]
    contents = [(tmp_path / "m.idx").read_bytes(), (tmp_path / "m.bin").read_bytes()]
    args = type("Args", (), {"dtype": None})()
    docs, _ = prepare_data._token_documents(args, "megatron", files, contents, 1000, 0)
    assert [d.dtype for _, d in docs] == [np.uint16, np.uint16] and docs[0][1].tolist() == [1, 2, 3, 0]
    docs, _ = prepare_data._token_documents(args, "megatron", files, contents, 100_000, 70_000)
    assert docs[1][1].dtype == np.uint32 and docs[1][1].tolist() == [4, 5, 70_000]


def test_tokenizer_without_eod_needs_eod_token(tmp_path, capsys):
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.WordLevel({"a": 0, "b": 1, "<stop>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("a b a b b a\n" * 10)
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.json", tmp_path / "t.txt")
    assert_one_error_line(rc, err, tmp_path / "tokenizer.json", "--eod-token")
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.json",
                      "--eod-token", "<stop>", "--vocab", 70000, tmp_path / "t.txt")
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", 70000)
    assert meta["dtype"] == "uint32" and meta["eod_id"] == 2 and meta["tokenizer"]["eod_token"] == "<stop>"
    assert np.concatenate([train, val]).tolist() == [0, 1, 0, 1, 1, 0] * 10 + [2]
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    rc, err = prepare(capsys, "--out", tmp_path / "out2", "--tokenizer", tmp_path / "broken.json", tmp_path / "t.txt")
    assert_one_error_line(rc, err, tmp_path / "broken.json", "not a Hugging Face tokenizers file")


def test_megatron_with_tokenizer_uses_its_eod(tmp_path, capsys, bpe):
    codec = HFCodec.from_file(bpe)
    docs = [[codec.encode(t)] for t in ("import os\n", "x = 1\n", "def f(): pass\n")]
    write_megatron(tmp_path / "m", docs, np.uint16)
    rc, err = prepare(capsys, "--out", tmp_path / "out", "--format", "megatron", "--tokenizer", bpe,
                      "--val-frac", "0.4", tmp_path / "m.bin")
    assert rc == 0, err
    train, val, meta = tokens_of(tmp_path / "out", 512)
    exp = expected_split([(f"m#{i}", [*d[0], 0]) for i, d in enumerate(docs)], 0.4)
    assert (train.tolist(), val.tolist()) == exp and meta["tokenizer"]["kind"] == "hf"
    assert load_codec(tmp_path / "out").decode(np.concatenate([train, val])).count("<|endoftext|>") == 3


def _train_tiny(tmp_path, vocab: int, data_dir, steps: int = 12) -> list[dict]:
    """A tiny MoE model trained `steps` steps at world 1 on CPU on the token directory `data_dir`;
    its metrics.jsonl records."""
    from moetrain.config import load_config
    from moetrain.parallel.mesh import LaunchEnv, init_parallel
    from moetrain.train.loop import run_training

    overrides = [f"model.vocab_size={vocab}", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
                 "model.max_seq_len=32", "model.ffn_hidden=64", "moe.num_experts=4", "moe.top_k=2",
                 "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8", f"train.steps={steps}",
                 "train.warmup_steps=2", "train.lr=1e-2", f"train.eval_every={steps}", "train.eval_batches=2",
                 "train.progress=false", "train.device=cpu", "logging.every=1", "logging.tensorboard=false",
                 "checkpoint.every=0", "data.source=memmap", f"data.path={data_dir}",
                 f"logging.dir={tmp_path / 'runs'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides)
    par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    run_training(cfg, par, data, log=lambda m: None)
    return [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]


def test_bpe_data_trains(tmp_path, capsys, bpe):
    """Prepare text with the BPE tokenizer, then train a tiny model on it (world 1, CPU): the run
    completes with finite losses and the loss falls."""
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(_corpus_texts(40)):
        (src / f"m{i:02d}.py").write_text(t)
    rc, err = prepare(capsys, "--out", tmp_path / "tok", "--tokenizer", bpe, "--val-frac", "0.1", src)
    assert rc == 0, err
    recs = _train_tiny(tmp_path, 512, tmp_path / "tok")
    losses = [r["loss"] for r in recs]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert recs[-1]["val_loss"] < recs[0]["init_val_loss"] and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_uint32_vocabulary_trains(tmp_path):
    """A vocabulary past uint16 (70,000 ids, uint32 token files) trains: config, data and model agree."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 70_000, size=4096)
    tokens[::7] = 69_999                                  # ids past 65535 occur
    write_token_dir(tmp_path / "tok", tokens[:3500], tokens[3500:], 70_000)
    recs = _train_tiny(tmp_path, 70_000, tmp_path / "tok", steps=3)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
