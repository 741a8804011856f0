"""Text <-> token ids for the tools that meet text (prepare_data, generate, export_hf).

A token directory's meta.json names its tokenizer under "tokenizer":
  - "bytes" (or absent: directories written before tokenizers existed): one token per byte,
    ids 0..255, end of document = byte 0;
  - {"kind": "hf", "file": "tokenizer.json", "sha256": HEX, "eod_id": INT or null, ...}: a
    Hugging Face `tokenizers` file stored inside the token directory (copied there by
    tools/prepare_data.py, so the directory is self-contained and nothing is downloaded at run
    time); its sha256 is checked when the codec is loaded. It must be a regular file in the
    directory itself: a symlink (which could point anywhere, e.g. /dev/zero or outside the
    directory) is refused, and so is a file over MAX_TOKENIZER_BYTES (256 MiB);
  - "none": a corpus that arrived already tokenized (nanoGPT / Megatron-LM files) prepared
    without --tokenizer: the ids are known, the text they stand for is not.

End of document for a Hugging Face tokenizer (`HFCodec.from_file`): the token given as
`eod_token`, else the first of EOD_CANDIDATES that the tokenizer has; None when it has none
(callers that need one, such as prepare_data on text, refuse with one line asking for it).

Any truncation or padding a tokenizer.json carries (common in downloaded files) is turned off:
encode() and encode_batch() return every token of every text, unpadded.

`load_codec(token_dir)` returns the codec a directory was written with. Every codec has
kind, vocab_size, eod_id, encode(str) -> list[int], decode(ids) -> str and meta() (what
meta.json records). The training path never imports this module; only HFCodec imports the
optional dependency (`tokenizers`, the `hf` extra), lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Optional, Sequence, Union

from moetrain.errors import first_line

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
HF_FILE = "tokenizer.json"  # the tokenizer's name inside a token directory
MAX_TOKENIZER_BYTES = 256 << 20   # tokenizer files read (and hashed) at most this large
MAX_META_BYTES = 16 << 20         # a token directory's meta.json


class TokenizerError(ValueError):
    """One-line, user-facing message naming the file and what is wrong."""


def _read_file(path: Path, limit: int, what: str, follow_symlinks: bool = True) -> bytes:
    """A regular file's bytes, bounded by ``limit`` and read non-blocking (a FIFO cannot hang it);
    with follow_symlinks=False a symlink is refused. One-line TokenizerError otherwise."""
    from moetrain.data_formats import InputError, read_regular, size_text

    try:
        st = os.stat(path) if follow_symlinks else os.lstat(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read {what} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise TokenizerError(f"{path}: {what} is a symlink; it must be a regular file in the directory")
    if not stat.S_ISREG(st.st_mode):
        raise TokenizerError(f"{path}: cannot read {what} (not a regular file)")
    try:
        data = read_regular(path, limit, follow_symlinks=follow_symlinks)
    except InputError as e:
        raise TokenizerError(str(e)) from None
    if len(data) > limit:
        raise TokenizerError(f"{path}: {what} is over {size_text(limit)}; refusing to read it")
    return data


class ByteCodec:
    """One token per UTF-8 byte; decoding replaces invalid sequences (a model may stop mid-character)."""
    kind = "bytes"
    vocab_size = 256
    eod_id: Optional[int] = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def meta(self) -> str:
        return "bytes"


class HFCodec:
    """A Hugging Face `tokenizers` file. encode() adds no special tokens (no BOS/EOS template):
    documents are raw text and prepare_data appends eod_id itself; decode() keeps special tokens
    (an end of document shows as its text, e.g. <|endoftext|>)."""
    kind = "hf"

    def __init__(self, content: bytes, name: str, eod_id: Optional[int] = None,
                 eod_token: Optional[str] = None):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(f"{name}: reading a Hugging Face tokenizer needs the `tokenizers` "
                                 "package (pip install -e .[hf])") from None
        try:
            self._tok = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
            raise TokenizerError(f"{name}: not a Hugging Face tokenizers file ({first_line(e)})") from None
        self._tok.no_truncation()   # settings stored in the file would cut and pad documents silently
        self._tok.no_padding()
        self.name = name
        self.content = content  # the file's bytes, as hashed: prepare_data copies exactly these
        self.sha256 = hashlib.sha256(content).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0  # ids may be sparse: max id + 1
        if self.vocab_size < 1:
            raise TokenizerError(f"{name}: the tokenizer has an empty vocabulary")
        if eod_id is not None and not 0 <= eod_id < self.vocab_size:
            raise TokenizerError(f"{name}: end-of-document id {eod_id} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        self.eod_id = eod_id
        self.eod_token = eod_token if eod_token is not None else (
            None if eod_id is None else self._tok.id_to_token(eod_id))

    @classmethod
    def from_file(cls, path: Union[str, Path], eod_token: Optional[str] = None) -> "HFCodec":
        """Load a tokenizer.json; end of document = ``eod_token`` (must exist in the vocabulary),
        else the first of EOD_CANDIDATES present, else None."""
        path = Path(path)
        content = _read_file(path, MAX_TOKENIZER_BYTES, "the tokenizer file")
        codec = cls(content, str(path))
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        for text in candidates:
            token_id = codec._tok.token_to_id(text)
            if token_id is not None:
                codec.eod_id, codec.eod_token = int(token_id), text
                break
        else:
            if eod_token is not None:
                raise TokenizerError(f"{path}: --eod-token {eod_token!r} is not a token of this tokenizer")
        return codec

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_str(self, token_id: int) -> Optional[str]:
        """The token's string in the vocabulary (None for an unknown id)."""
        return self._tok.id_to_token(int(token_id))

    def meta(self) -> dict:
        return {"kind": "hf", "file": HF_FILE, "sha256": self.sha256, "eod_id": self.eod_id,
                "eod_token": self.eod_token, "vocab_size": self.vocab_size}


def load_codec(token_dir) -> Union[ByteCodec, HFCodec]:
    """The codec a token directory was written with (see the module docstring)."""
    directory = Path(token_dir).expanduser()
    meta_path = directory / "meta.json"
    raw = _read_file(meta_path, MAX_META_BYTES, "the token directory's meta.json")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise TokenizerError(f"{meta_path}: cannot read the token directory's meta.json "
                             "(JSON nested too deeply)") from None
    except ValueError as e:   # UnicodeDecodeError, JSONDecodeError, an over-long integer literal
        raise TokenizerError(f"{meta_path}: cannot read the token directory's meta.json ({first_line(e)})") from None
    spec = meta.get("tokenizer", "bytes") if isinstance(meta, dict) else None
    if spec == "bytes":
        return ByteCodec()
    if spec == "none":
        raise TokenizerError(f"{meta_path}: no tokenizer recorded (a pre-tokenized corpus prepared without "
                             "--tokenizer); rerun tools/prepare_data.py with --tokenizer PATH/tokenizer.json")
    if isinstance(spec, dict) and spec.get("kind") == "hf":
        fname = spec.get("file")
        if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
            raise TokenizerError(f"{meta_path}: tokenizer file {fname!r} is not a plain file name")
        path = directory / fname
        content = _read_file(path, MAX_TOKENIZER_BYTES, "the tokenizer file", follow_symlinks=False)
        digest = hashlib.sha256(content).hexdigest()
        if digest != spec.get("sha256"):
            raise TokenizerError(f"{path}: sha256 {digest[:12]}... does not match meta.json's "
                                 f"{str(spec.get('sha256'))[:12]}... (file replaced or corrupt)")
        eod_id = spec.get("eod_id")
        if eod_id is not None and (not isinstance(eod_id, int) or isinstance(eod_id, bool)):
            raise TokenizerError(f"{meta_path}: tokenizer eod_id must be an integer or null, got {eod_id!r}")
        return HFCodec(content, str(path), eod_id=eod_id, eod_token=spec.get("eod_token"))
    raise TokenizerError(f"{meta_path}: unknown tokenizer {spec!r}")


def codec_for_data(source: str, path: Optional[str]) -> Union[ByteCodec, HFCodec]:
    """The codec of a training run's data (its config's data.source / data.path): the embedded
    corpus is byte level; a token directory says in its meta.json (load_codec)."""
    if source == "stdlib":
        return ByteCodec()
    if not path:
        raise TokenizerError(f"data.source={source!r} without data.path: no token directory to read a tokenizer from")
    return load_codec(path)
