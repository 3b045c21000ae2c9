"""Checkpoint tensor reads straight into the live tensors, for local folders.

DCP's reader runs `torch.load` on each tensor's `torch.save` record, which allocates fresh memory,
then copies it into the destination. When a whole stored chunk lands in a contiguous CPU tensor of
its dtype, the record's raw `data/0` bytes are read with `readinto` into the destination's own
memory instead. The record's pickle is parsed, never run; anything not recognised goes to DCP.

It relies on DCP's reader internals and on `torch.save`'s record layout as of the torch version in
`WRITTEN_FOR`; on any other version DCP reads everything (`supported`), until the comparison
tests in tests/test_checkpoint_direct_read.py pass there and the version is added.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickletools
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from ..errors import DamagedCheckpoint

log = logging.getLogger(__name__)

# (major, minor) versions of torch whose DCP reader and torch.save records this module was checked against.
WRITTEN_FOR: frozenset[tuple[int, int]] = frozenset({(2, 13)})
# torch.save's data.pkl for one tensor is a few hundred bytes; a bigger one is not a plain tensor.
MAX_PICKLE_BYTES = 64 * 1024
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50


def supported(version: str = torch.__version__) -> bool:
    """Whether `version` of torch is one this module was written and tested for."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) in WRITTEN_FOR


@dataclass(frozen=True)
class TensorRecord:
    """What a `torch.save` record's pickle says about its one tensor."""

    storage_type: str
    storage_key: str
    location: str
    storage_numel: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def parse_tensor_pickle(data: bytes) -> TensorRecord | None:
    """The tensor a `torch.save(tensor)` pickle describes, read opcode by opcode without running it.

    Only the opcodes torch.save emits for one plain tensor are understood; anything else gives None.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "GLOBAL" and isinstance(arg, str):
                module, _, attr = arg.partition(" ")
                stack.append(("global", module, attr))
            elif name in ("BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET") and isinstance(arg, int):
                stack.append(memo[arg])
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1"):
                stack.append(arg)
            elif name in ("NEWFALSE", "NEWTRUE"):
                stack.append(name == "NEWTRUE")
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                if len(items) != n:
                    return None
                del stack[-n:]
                stack.append(items)
            elif name == "TUPLE":
                start = marks.pop()
                items = tuple(stack[start:])
                del stack[start:]
                stack.append(items)
            elif name == "BINPERSID":
                stack.append(("persistent", stack.pop()))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                if fn == ("global", "collections", "OrderedDict") and args == ():
                    stack.append(("hooks",))
                elif fn == ("global", "torch._utils", "_rebuild_tensor_v2"):
                    stack.append(("tensor", args))
                else:
                    return None
            elif name == "STOP":
                return _tensor_record(stack.pop()) if len(stack) == 1 and not marks else None
            else:
                return None
    except (ValueError, IndexError, KeyError, TypeError):
        return None
    return None


def _tensor_record(value: Any) -> TensorRecord | None:
    match value:
        case ("tensor", (("persistent", ("storage", ("global", "torch", str(storage_type)), str(key),
                                         str(location), int(numel))),
                         int(offset), tuple(size), tuple(stride), False, ("hooks",))):
            if all(type(s) is int for s in size + stride):
                return TensorRecord(storage_type, key, location, numel, offset, size, stride)
    return None


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride), strict=False):  # lengths compared below
        if n != 1 and s != expected:
            return False
        expected *= n
    return len(size) == len(stride)


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    """`FloatStorage` -> torch.float32 etc.: the storage class names torch.save pickles."""
    with warnings.catch_warnings():  # the legacy storage classes warn that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        return {name: cls.dtype for name, cls in vars(torch).items()
                if name.endswith("Storage") and isinstance(cls, type)
                and issubclass(cls, torch.storage.TypedStorage) and name not in ("Storage", "TypedStorage")}


class _RecordView:
    """One record of a `.distcp` file as a seekable read-only file of its own, for `zipfile`."""

    def __init__(self, stream: IO[bytes], offset: int, length: int) -> None:
        self.stream, self.offset, self.length, self.pos = stream, offset, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = min(max(base + pos, 0), self.length)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.stream.seek(self.offset + self.pos)
        data = self.stream.read(n)
        self.pos += len(data)
        return data


def _entry_start(view: _RecordView, info: zipfile.ZipInfo, end: int) -> int | None:
    """Where an uncompressed zip entry's bytes start, if its local header agrees with `info` and its
    bytes end by `end`. CRCs are not checked: torch.save may skip them, and torch.load ignores them."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    view.seek(info.header_offset)
    header = view.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    signature, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_HEADER_SIGNATURE or method != zipfile.ZIP_STORED:
        return None
    if view.read(name_len) != info.filename.encode():
        return None
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return start if start + info.file_size <= end else None


def _entry_bytes(view: _RecordView, info: zipfile.ZipInfo, end: int) -> bytes | None:
    start = _entry_start(view, info, end)
    if start is None:
        return None
    view.seek(start)
    data = view.read(info.file_size)
    return data if len(data) == info.file_size else None


def locate_payload(stream: IO[bytes], offset: int, length: int, dtype: torch.dtype,
                   size: tuple[int, ...]) -> int | None:
    """The file offset of a `torch.save` record's raw tensor bytes, or None unless the record holds
    exactly one contiguous little-endian tensor of `dtype` and `size`, stored uncompressed."""
    view = _RecordView(stream, offset, length)
    try:
        with zipfile.ZipFile(view) as zf:
            listed = zf.infolist()
            end = zf.start_dir  # entries' bytes end where the central directory starts
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, NotImplementedError, struct.error):
        return None
    infos = {info.filename.split("/", 1)[-1]: info for info in listed}
    pkl, order, payload = infos.get("data.pkl"), infos.get("byteorder"), infos.get("data/0")
    if (len({info.filename.split("/", 1)[0] for info in listed}) != 1 or len(infos) != len(listed)
            or pkl is None or order is None or payload is None
            or any(k.startswith("data/") and k != "data/0" for k in infos)
            or pkl.file_size > MAX_PICKLE_BYTES or order.file_size > 16):
        return None
    if _entry_bytes(view, order, end) != b"little":
        return None
    pickled = _entry_bytes(view, pkl, end)
    record = None if pickled is None else parse_tensor_pickle(pickled)
    if (record is None or record.storage_key != "0" or record.location != "cpu"
            or _storage_dtypes().get(record.storage_type) != dtype or record.storage_offset != 0
            or record.size != size or record.storage_numel != math.prod(size)
            or not _contiguous(record.size, record.stride)
            or payload.file_size != math.prod(size) * dtype.itemsize):
        return None
    start = _entry_start(view, payload, end)
    return None if start is None else offset + start


class Readable(Protocol):
    """A binary file that reads into a caller's buffer (what DCP's local `create_stream` returns)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def read_into(stream: Readable, position: int, dest: torch.Tensor, url: str) -> None:
    """Fill contiguous CPU `dest` with the bytes of `stream` from `position`; DamagedCheckpoint if short."""
    buffer = dest.reshape(-1).view(torch.uint8).numpy().data
    stream.seek(position)
    done = 0
    while done < len(buffer):
        n = stream.readinto(buffer[done:])
        if not n:
            raise DamagedCheckpoint(f"{url} ends {len(buffer) - done} bytes early inside a tensor's data")
        done += n


def _whole_chunk(req: ReadItem, md: TensorStorageMetadata) -> ChunkStorageMetadata | None:
    """The stored chunk `req` reads, if it reads all of it."""
    offsets = req.storage_index.offset
    chunk = next((c for c in md.chunks if c.offsets == offsets), None)
    if chunk is None or any(req.storage_offsets) or tuple(req.lengths) != tuple(chunk.sizes):
        return None
    return chunk


def _destination(req: ReadItem, planner: LoadPlanner, metadata: Metadata, info: Any) -> torch.Tensor | None:
    """The live tensor `req` fills, when its bytes can be read straight into it."""
    md = metadata.state_dict_metadata.get(req.storage_index.fqn)
    if (req.type != LoadItemType.TENSOR or not isinstance(md, TensorStorageMetadata)
            or info.transform_descriptors or _whole_chunk(req, md) is None):
        return None
    dest = planner.resolve_tensor(req).detach()
    if (type(dest) is not torch.Tensor or dest.device.type != "cpu" or dest.layout != torch.strided
            or dest.dtype != md.properties.dtype or dest.is_quantized or dest.is_conj() or dest.is_neg()
            or not dest.is_contiguous() or dest.numel() == 0 or tuple(dest.shape) != tuple(req.lengths)):
        return None
    return dest


def read_directly(reader: Any, plan: LoadPlan, planner: LoadPlanner, url: str) -> LoadPlan:
    """Read the tensors of `plan` that allow it straight into their destinations; the rest, for DCP.

    `reader` is DCP's fsspec reader after `set_up_storage_reader`, `metadata` kept on it."""
    from fsspec.implementations.local import LocalFileSystem

    metadata: Metadata | None = getattr(reader, "metadata", None)
    if sys.byteorder != "little" or metadata is None or not isinstance(reader.fs.fs, LocalFileSystem):
        return plan
    rest: list[ReadItem] = []
    per_file: dict[str, list[tuple[Any, ReadItem, torch.Tensor]]] = {}
    for req in plan.items:
        info = reader.storage_data[req.storage_index]
        dest = _destination(req, planner, metadata, info)
        if dest is None:
            rest.append(req)
        else:
            per_file.setdefault(info.relative_path, []).append((info, req, dest))
    direct = 0
    for relative_path, items in per_file.items():
        path = reader.fs.concat_path(reader.path, relative_path)
        file_url = f"{url.rstrip('/')}/{relative_path}"
        with reader.fs.create_stream(path, "rb") as stream:
            for info, req, dest in sorted(items, key=lambda item: item[0].offset):
                position = locate_payload(stream, info.offset, info.length, dest.dtype, tuple(dest.shape))
                if position is None:
                    rest.append(req)
                    continue
                read_into(stream, position, dest, file_url)
                planner.commit_tensor(req, dest)
                direct += 1
    reader.direct_reads += direct
    log.debug("%s: read %d tensors straight into their destinations, %d items through DCP",
              url, direct, len(rest))
    return replace(plan, items=rest)
