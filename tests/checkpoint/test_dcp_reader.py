"""checkpoint/dcp_reader.py: the restricted unpickler of DCP `.metadata` and the tensor-only reader.

Real metadata (tensors, DTensor shards, every dtype we write) parses to exactly what stock DCP
reads; every way a pickle can reach code or mutate a class is refused, and refused before it
runs (the payloads here would create a marker file)."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as M

from moetrain.checkpoint import dcp_reader as R
from moetrain.checkpoint import store
from moetrain.checkpoint.store import CheckpointError

MD = "torch.distributed.checkpoint.metadata"


def _u(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _glob(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + pickle.STACK_GLOBAL


def _p(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + pickle.STOP


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint with every dtype and shape kind we store (scalars, vectors, matrices)."""
    root = tmp_path_factory.mktemp("reader")
    flat = {"model/w": torch.randn(4, 3), "model/b": torch.zeros(3, dtype=torch.bfloat16),
            "train/step": torch.tensor(7), "rng/rank_00000/torch": torch.get_rng_state(),
            "rng/rank_00000/gauss": torch.zeros(3, dtype=torch.float64)}
    tmp = store.tmp_dir_for(str(root), 7)
    store.save_dcp(flat, tmp, None)
    return store.commit(tmp, str(root), 7, {}), flat


def test_real_metadata_parses_like_stock_dcp(saved):
    path, _ = saved
    data = open(os.path.join(path, ".metadata"), "rb").read()
    ours = R.loads_metadata(data)
    stock = dcp.FileSystemReader(path).read_metadata()
    stock.storage_meta.load_id = None
    assert ours == stock
    assert store.verify(path, contents=True).metadata == ours


def test_load_round_trip(saved):
    path, flat = saved
    back = {k: torch.empty_like(v) for k, v in flat.items()}
    store.load_dcp(back, path, None)
    assert all(torch.equal(back[k], flat[k]) for k in flat)


@pytest.mark.parametrize("name, data", [
    ("os.system", _p(_glob("os", "system") + _u("touch MARK") + pickle.TUPLE1 + pickle.REDUCE)),
    ("builtins.eval", _p(_glob("builtins", "eval") + _u("1") + pickle.TUPLE1 + pickle.REDUCE)),
    ("text GLOBAL", _p(pickle.GLOBAL + b"posix\nsystem\n" + _u("touch MARK") + pickle.TUPLE1 + pickle.REDUCE)),
    ("torch.load", _p(_glob("torch", "load") + _u("x") + pickle.TUPLE1 + pickle.REDUCE)),
    ("a torch name that is no dtype", _p(_glob("torch", "_C"))),
    ("a call of a dataclass", _p(_glob(MD, "Metadata") + pickle.EMPTY_DICT + pickle.TUPLE1 + pickle.REDUCE)),
    ("NEWOBJ with arguments", _p(_glob(MD, "StorageMeta") + _u("x") + pickle.TUPLE1 + pickle.NEWOBJ)),
    ("NEWOBJ of torch.Size", _p(_glob("torch", "Size") + pickle.EMPTY_TUPLE + pickle.NEWOBJ)),
    ("NEWOBJ_EX", _p(_glob(MD, "StorageMeta") + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.NEWOBJ_EX)),
    # BUILD on a class object: (None, {attr: value}) would setattr on the class, process-wide
    ("BUILD on a class", _p(_glob(MD, "Metadata") + pickle.NONE + pickle.EMPTY_DICT + _u("__eq__")
                            + _glob("torch", "Size") + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD)),
    ("BUILD on a function", _p(_glob("torch.serialization", "_get_layout") + pickle.EMPTY_DICT + _u("cache")
                               + pickle.EMPTY_DICT + pickle.SETITEM + pickle.BUILD)),
    ("BUILD with a foreign field", _p(_glob(MD, "StorageMeta") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
                                      + pickle.EMPTY_DICT + _u("__class__") + pickle.NONE + pickle.SETITEM
                                      + pickle.BUILD)),
    ("BUILD with slot state", _p(_glob(MD, "StorageMeta") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.NONE
                                 + pickle.EMPTY_DICT + pickle.TUPLE2 + pickle.BUILD)),
    ("an object as call argument", _p(_glob("torch", "Size") + _glob(MD, "StorageMeta") + pickle.EMPTY_TUPLE
                                      + pickle.NEWOBJ + pickle.TUPLE1 + pickle.TUPLE1 + pickle.REDUCE)),
    ("INST", b"(iposix\nsystem\nS'touch MARK'\n."),
    ("OBJ", _p(pickle.MARK + _glob("torch", "Size") + pickle.OBJ)),
    ("EXT1", b"\x80\x02\x82\x01."),
    ("persistent id", _p(_u("x") + pickle.BINPERSID)),
])
def test_refused_before_anything_runs(name, data):
    with pytest.raises(R.UnsafeMetadataError):
        R.loads_metadata(data)


def test_an_exploit_that_returns_real_metadata_is_refused(saved, tmp_path):
    path, _ = saved
    real = open(os.path.join(path, ".metadata"), "rb").read()
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return eval, (f"__import__('pathlib').Path({str(marker)!r}).touch() or __import__('pickle').loads({real!r})",)

    data = pickle.dumps(Payload(), protocol=4)
    pickle.loads(data)                      # the stock unpickler runs it ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(R.UnsafeMetadataError, match="builtins.eval"):
        R.loads_metadata(data)              # ... ours does not
    assert not marker.exists()


def _md_with(storage_info) -> bytes:
    size = torch.Size([2])
    md = M.Metadata({"x": M.TensorStorageMetadata(M.TensorProperties(torch.float32), size,
                                                  [M.ChunkStorageMetadata(torch.Size([0]), size)])},
                    storage_data={M.MetadataIndex("x", torch.Size([0])): storage_info})
    return pickle.dumps(md)


@pytest.mark.parametrize("rel, transforms, words", [
    ("../other/__0_0.distcp", None, "not a file of the checkpoint directory"),
    ("/etc/passwd", None, "not a file of the checkpoint directory"),
    ("__0_0.distcp", ["zstd/1"], "stream transforms"),
])
def test_malformed_metadata_is_an_error(rel, transforms, words):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    data = _md_with(_StorageInfo(rel, 0, 8, transform_descriptors=transforms))
    with pytest.raises(ValueError, match=words):
        R.loads_metadata(data)
    assert isinstance(R.loads_metadata(_md_with(_StorageInfo("__0_0.distcp", 0, 8))), M.Metadata)
    with pytest.raises(ValueError, match="not DCP Metadata"):
        R.loads_metadata(pickle.dumps({"a": 1}))


def test_pickled_entries_are_never_read(tmp_path):
    """Stock DCP reads a non-tensor entry with torch.load(weights_only=False); load_dcp refuses it
    whatever target it is asked into, and the payload never runs."""
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",)

    path = str(tmp_path / "ck")
    dcp.save({"x": torch.ones(2), "obj": Payload()}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    for target in (torch.empty(1), b""):
        with pytest.raises(CheckpointError, match="entry obj is a pickled object"):
            store.load_dcp({"x": torch.empty(2), "obj": target}, path, None)
    assert not marker.exists()
    x = {"x": torch.empty(2)}
    store.load_dcp(x, path, None)            # its tensors still read (format_version 1 upgrades)
    assert torch.equal(x["x"], torch.ones(2))
    dcp.load({"obj": b""}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    assert marker.exists()                   # stock DCP: the payload runs
