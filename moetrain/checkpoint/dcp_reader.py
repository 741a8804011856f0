"""Reading torch.distributed.checkpoint (DCP) files without ever running code from them.

A checkpoint is shared between people and clusters, so reading one must not execute anything
it contains. Stock DCP does in two places (torch 2.x, distributed/checkpoint/):
  - FileSystemReader.read_metadata: `pickle.load` of `.metadata` (every rank, every load);
  - DefaultLoadPlanner.load_bytes: `torch.load(weights_only=False)` of every non-tensor entry.
(Tensor entries are read with `torch.load(weights_only=True)`, torch's own restricted loader.)

Here `.metadata` is parsed by MetadataUnpickler, a pure-Python unpickler that admits only:
  - globals: the DCP metadata dataclasses (Metadata, TensorStorageMetadata, BytesStorageMetadata,
    ChunkStorageMetadata, TensorProperties, MetadataIndex, StorageMeta, filesystem._StorageInfo),
    the enum _MEM_FORMAT_ENCODING, torch.Size, torch dtypes (`torch.float32`...),
    torch.serialization._get_layout (how torch.strided is pickled), pathlib's path classes
    (StorageMeta.checkpoint_id) and collections.OrderedDict: every global found in the metadata
    of the checkpoints this project writes (native, FSDP, TP, EP, PEER, async, converted);
  - REDUCE (a call) only on torch.Size, _get_layout, _MEM_FORMAT_ENCODING, the path classes and
    OrderedDict; NEWOBJ only `cls.__new__(cls)` of the dataclasses; BUILD only on an instance
    of those dataclasses, with a dict of its own field names (TensorProperties: its 5-tuple);
  - no other opcode that can reach code: INST, OBJ, NEWOBJ_EX, EXT*, PERSID, buffers are refused.
The result is then checked field by field (types, non-negative offsets, shard files that are plain
names, no stream transforms), so later code can trust its shape. SafeReader (FileSystemReader with
that read_metadata and a read_data that refuses non-tensor items and stream transforms) and
SafePlanner (load_bytes refuses) are what store.load_dcp hands to dcp.load.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import metadata as M
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType

METADATA_FILE = ".metadata"


class UnsafeMetadataError(ValueError):
    """The pickle asks for something a DCP metadata file never holds."""


_DATACLASSES = (M.Metadata, M.TensorStorageMetadata, M.BytesStorageMetadata, M.ChunkStorageMetadata,
                M.TensorProperties, M.MetadataIndex, M.StorageMeta, _StorageInfo)
_PATHS = tuple(getattr(pathlib, n) for n in ("PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath"))
_get_layout = torch.serialization._get_layout
_CALLABLE = (torch.Size, _get_layout, M._MEM_FORMAT_ENCODING, collections.OrderedDict) + _PATHS
_CALLABLE_IDS = frozenset(map(id, _CALLABLE))
_DATACLASS_IDS = frozenset(map(id, _DATACLASSES))


def _admitted_globals() -> dict:
    table = {}
    for obj in _DATACLASSES + _CALLABLE:
        table[(obj.__module__, obj.__qualname__)] = obj
    for cls in _PATHS:                  # pickles name "pathlib" whatever module defines the class
        table[("pathlib", cls.__name__)] = cls
    table[("torch", "Size")] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    return table


_GLOBALS = _admitted_globals()
_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in _DATACLASSES}

_P = pickle._Unpickler.dispatch
# Opcodes that only build plain data (protocol 2-5 and the harmless text forms); everything that
# can call or look up something is either restricted below or absent, hence refused.
_DATA_OPCODES = (
    pickle.PROTO, pickle.FRAME, pickle.STOP, pickle.MARK, pickle.POP, pickle.POP_MARK, pickle.DUP,
    pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.INT, pickle.BININT, pickle.BININT1,
    pickle.BININT2, pickle.LONG, pickle.LONG1, pickle.LONG4, pickle.FLOAT, pickle.BINFLOAT,
    pickle.SHORT_BINUNICODE, pickle.BINUNICODE, pickle.BINUNICODE8, pickle.SHORT_BINBYTES,
    pickle.BINBYTES, pickle.BINBYTES8, pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2,
    pickle.TUPLE3, pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS, pickle.LIST, pickle.EMPTY_DICT,
    pickle.DICT, pickle.SETITEM, pickle.SETITEMS, pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET,
    pickle.MEMOIZE, pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.PUT, pickle.BINPUT,
    pickle.LONG_BINPUT, pickle.GLOBAL, pickle.STACK_GLOBAL)


class MetadataUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with an allow-list of opcodes, globals, calls and BUILDs."""

    dispatch = {}

    def find_class(self, module, name):
        obj = _GLOBALS.get((module, name))
        if obj is None:
            raise UnsafeMetadataError(f"it references {module}.{name}, which DCP metadata never holds")
        return obj

    def persistent_load(self, pid):
        raise UnsafeMetadataError("it uses a persistent id, which DCP metadata never holds")

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE_IDS or type(args) is not tuple:
            raise UnsafeMetadataError(f"it calls {_name(func)}, which DCP metadata never does")
        try:
            _plain(args, "arguments")
        except ValueError:
            raise UnsafeMetadataError(f"it calls {_name(func)} with objects as arguments") from None
        self.stack[-1] = func(*args)

    def _newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        no_args = type(args) is tuple and not args
        if id(cls) not in _DATACLASS_IDS or not no_args:
            raise UnsafeMetadataError(f"it creates {_name(cls)}{'' if no_args else ' with arguments'}, "
                                      "which DCP metadata never does")
        self.append(cls.__new__(cls))

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if id(cls) not in _DATACLASS_IDS:
            raise UnsafeMetadataError(f"it sets the state of {_name(inst)}, which DCP metadata never does")
        if cls is M.TensorProperties:
            if not (type(state) is tuple and len(state) == 5 and isinstance(state[0], torch.dtype)
                    and isinstance(state[1], torch.layout) and type(state[2]) is bool
                    and isinstance(state[3], M._MEM_FORMAT_ENCODING) and type(state[4]) is bool):
                raise UnsafeMetadataError("it holds a malformed TensorProperties state")
            inst.__setstate__(state)
            return
        if type(state) is not dict or not all(type(k) is str and k in _FIELDS[cls] for k in state):
            raise UnsafeMetadataError(f"it sets fields of {cls.__name__} that it does not have")
        inst.__dict__.update(state)

    def _refuse(self):
        raise UnsafeMetadataError("it uses a pickle opcode that DCP metadata never needs")


MetadataUnpickler.dispatch = collections.defaultdict(lambda: MetadataUnpickler._refuse)
for _op in _DATA_OPCODES:
    MetadataUnpickler.dispatch[_op[0]] = _P[_op[0]]
MetadataUnpickler.dispatch[pickle.REDUCE[0]] = MetadataUnpickler._reduce
MetadataUnpickler.dispatch[pickle.NEWOBJ[0]] = MetadataUnpickler._newobj
MetadataUnpickler.dispatch[pickle.BUILD[0]] = MetadataUnpickler._build


def _name(obj) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def loads_metadata(data: bytes) -> M.Metadata:
    """Parse the bytes of a `.metadata` file. Raises UnsafeMetadataError (refused: it would run
    or construct something else) or ValueError (malformed)."""
    try:
        md = MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeMetadataError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError,
            AttributeError, RecursionError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a valid pickle ({type(exc).__name__}: {exc})"[:300]) from None
    check_structure(md)
    return md


def _size(v, what: str) -> None:
    if type(v) is not torch.Size or any(type(x) is not int or x < 0 for x in v):
        raise ValueError(f"{what} is not a shape")


def check_structure(md) -> None:
    """Every field of the parsed metadata has the type and range that readers rely on."""
    if type(md) is not M.Metadata:
        raise ValueError(f"it holds a {type(md).__name__}, not DCP Metadata")
    sdm = getattr(md, "state_dict_metadata", None)
    if type(sdm) is not dict:
        raise ValueError("state_dict_metadata is not a dict")
    for key, entry in sdm.items():
        if type(key) is not str:
            raise ValueError("a key is not a string")
        if type(entry) is M.BytesStorageMetadata:
            continue
        if type(entry) is not M.TensorStorageMetadata:
            raise ValueError(f"entry {key} is neither a tensor nor bytes")
        props = getattr(entry, "properties", None)
        if type(props) is not M.TensorProperties or not isinstance(getattr(props, "dtype", None), torch.dtype):
            raise ValueError(f"entry {key} has no dtype")
        _size(getattr(entry, "size", None), f"entry {key}'s size")
        chunks = getattr(entry, "chunks", None)
        if type(chunks) is not list:
            raise ValueError(f"entry {key}'s chunks are not a list")
        for c in chunks:
            if type(c) is not M.ChunkStorageMetadata:
                raise ValueError(f"entry {key} has a malformed chunk")
            _size(getattr(c, "offsets", None), f"a chunk of {key}")
            _size(getattr(c, "sizes", None), f"a chunk of {key}")
            if len(c.offsets) != len(entry.size) or len(c.sizes) != len(entry.size) or any(
                    o + s > n for o, s, n in zip(c.offsets, c.sizes, entry.size)):
                raise ValueError(f"a chunk of {key} lies outside the tensor")
    storage = getattr(md, "storage_data", None)
    if type(storage) is not dict:
        raise ValueError("storage_data is not a dict")
    for index, info in storage.items():
        if type(index) is not M.MetadataIndex or type(getattr(index, "fqn", None)) is not str:
            raise ValueError("a storage index is malformed")
        if getattr(index, "offset", None) is not None:
            _size(index.offset, f"the storage index of {index.fqn}")
        if type(getattr(index, "index", None)) not in (int, type(None)):
            raise ValueError(f"the storage index of {index.fqn} is malformed")
        if type(info) is not _StorageInfo:
            raise ValueError(f"the storage record of {index.fqn} is malformed")
        rel = getattr(info, "relative_path", None)
        if type(rel) is not str or not rel or rel in (".", "..") or "/" in rel or "\\" in rel or "\0" in rel:
            raise ValueError(f"{index.fqn} is stored in {rel!r}, not a file of the checkpoint directory")
        for f in ("offset", "length"):
            v = getattr(info, f, None)
            if type(v) is not int or v < 0:
                raise ValueError(f"the {f} of {index.fqn} is not an integer >= 0")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{index.fqn} is stored through stream transforms "
                             f"{list(info.transform_descriptors)!r}, which moetrain never writes")
    _plain(getattr(md, "planner_data", None), "planner_data")
    meta = getattr(md, "storage_meta", None)
    if meta is not None and type(meta) is not M.StorageMeta:
        raise ValueError("storage_meta is malformed")
    if type(getattr(md, "version", None)) not in (str, type(None)):
        raise ValueError("version is not a string")


def _plain(v, what: str, depth: int = 0) -> None:
    if depth > 20:
        raise ValueError(f"{what} is nested too deeply")
    if v is None or type(v) in (str, int, float, bool):
        return
    if type(v) in (list, tuple):
        for x in v:
            _plain(x, what, depth + 1)
    elif type(v) in (dict, collections.OrderedDict):
        for k, x in v.items():
            _plain(k, what, depth + 1)
            _plain(x, what, depth + 1)
    else:
        raise ValueError(f"{what} holds a {type(v).__name__}")


def bytes_entries(md: M.Metadata) -> list[str]:
    """Keys stored as pickled objects (DCP reads them with torch.load(weights_only=False))."""
    return sorted(k for k, v in md.state_dict_metadata.items() if type(v) is M.BytesStorageMetadata)


class SafeReader(FileSystemReader):
    """FileSystemReader that parses `.metadata` with MetadataUnpickler and reads tensors only
    (a pickled entry that is listed but never asked for is never read).

    read_metadata takes no **kwargs on purpose: DCP then never falls back to rank-local
    `__<rank>.metadata` files (which moetrain never writes)."""

    def read_metadata(self) -> M.Metadata:
        path = self.fs.concat_path(self.path, METADATA_FILE)
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            md = loads_metadata(data)
        except ValueError as exc:      # UnsafeMetadataError included
            raise ValueError(f"file {METADATA_FILE} of {self.path} is refused: {exc}") from None
        if md.storage_meta is None:
            md.storage_meta = M.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise ValueError(f"entry {item.storage_index.fqn} is a pickled object; refusing to unpickle it")
            if getattr(self.storage_data[item.storage_index], "transform_descriptors", None):
                raise ValueError(f"entry {item.storage_index.fqn} is stored through stream transforms")
        return super().read_data(plan, planner)


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose load_bytes (torch.load(weights_only=False) in torch) refuses."""

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"entry {read_item.dest_index.fqn} is a pickled object; refusing to unpickle it")
