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
# A record's first bytes hold its local headers, pickle and byte order; its last, the central directory.
HEAD_BYTES = 4096
TAIL_BYTES = 1024
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIGNATURE = 0x02014B50
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIGNATURE = 0x06054B50
_ZIP64 = 0xFFFFFFFF  # a size or offset that lives in a zip64 field instead


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


@functools.lru_cache(maxsize=4096)
def parse_tensor_pickle(data: bytes) -> TensorRecord | None:
    """The tensor a `torch.save(tensor)` pickle describes, read opcode by opcode without running it.

    Only the opcodes torch.save emits for one plain tensor are understood; anything else gives None.
    Cached: tensors of one shape and dtype (a layer's weights, Adam's two moments) share a pickle.
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


class _RecordBytes:
    """A `.distcp` record's first and last bytes, read once each; other ranges read on demand."""

    def __init__(self, stream: IO[bytes], offset: int, length: int) -> None:
        self.stream, self.offset, self.length = stream, offset, length
        self.head = self._read(0, min(length, HEAD_BYTES))
        tail_start = max(length - TAIL_BYTES, len(self.head))
        self.tail_start = tail_start
        self.tail = self._read(tail_start, length - tail_start) if tail_start < length else b""

    def _read(self, start: int, n: int) -> bytes:
        self.stream.seek(self.offset + start)
        return self.stream.read(n)

    def at(self, start: int, n: int) -> bytes:
        """`n` bytes from `start` within the record (fewer past its end)."""
        n = max(0, min(n, self.length - start))
        if start + n <= len(self.head):
            return self.head[start:start + n]
        if start >= self.tail_start:
            return self.tail[start - self.tail_start:start - self.tail_start + n]
        return self._read(start, n)


@dataclass(frozen=True)
class _ZipEntry:
    name: str
    header_offset: int
    size: int  # stored uncompressed: compressed and uncompressed sizes agree


def _central_directory(record: _RecordBytes) -> tuple[dict[str, _ZipEntry], int] | None:
    """The record's stored entries by name, and where the central directory starts; None for any
    layout torch.save does not write (a comment, zip64, compression, several disks)."""
    eocd = record.at(record.length - _EOCD.size, _EOCD.size)
    if len(eocd) != _EOCD.size:
        return None
    signature, disk, cd_disk, entries_here, entries, cd_size, cd_start, comment = _EOCD.unpack(eocd)
    # torch.save puts zip64 end records between the central directory and this one: the directory
    # must end before them, not right here.
    if (signature != _EOCD_SIGNATURE or disk or cd_disk or entries_here != entries or comment
            or _ZIP64 in (cd_size, cd_start) or cd_start + cd_size > record.length - _EOCD.size):
        return None
    cd = record.at(cd_start, cd_size)
    found: dict[str, _ZipEntry] = {}
    pos = 0
    for _ in range(entries):
        if pos + _CENTRAL.size > len(cd):
            return None
        fields = _CENTRAL.unpack_from(cd, pos)
        signature, method, compressed, size = fields[0], fields[4], fields[8], fields[9]
        name_len, extra_len, comment_len, header_offset = fields[10], fields[11], fields[12], fields[16]
        name = cd[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len].decode("utf-8", "replace")
        if (signature != _CENTRAL_SIGNATURE or method != zipfile.ZIP_STORED or compressed != size
                or _ZIP64 in (size, header_offset) or name in found):
            return None
        found[name] = _ZipEntry(name, header_offset, size)
        pos += _CENTRAL.size + name_len + extra_len + comment_len
    return found, cd_start


def _entry_start(record: _RecordBytes, entry: _ZipEntry, end: int) -> int | None:
    """Where a stored entry's bytes start, if its local header agrees and its bytes end by `end`.
    CRCs are not checked: torch.save may skip them, and torch.load ignores them."""
    header = record.at(entry.header_offset, _LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    signature, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_HEADER_SIGNATURE or method != zipfile.ZIP_STORED:
        return None
    if record.at(entry.header_offset + _LOCAL_HEADER.size, name_len) != entry.name.encode():
        return None
    start = entry.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return start if start + entry.size <= end else None


def _entry_bytes(record: _RecordBytes, entry: _ZipEntry, end: int) -> bytes | None:
    start = _entry_start(record, entry, end)
    return None if start is None else record.at(start, entry.size)


def locate_payload(stream: IO[bytes], offset: int, length: int, dtype: torch.dtype,
                   size: tuple[int, ...]) -> int | None:
    """The file offset of a `torch.save` record's raw tensor bytes, or None unless the record holds
    exactly one contiguous little-endian tensor of `dtype` and `size`, stored uncompressed.

    Reads the record's head and tail once (local headers, pickle and byte order sit in the first,
    the central directory in the last), not entry by entry."""
    record = _RecordBytes(stream, offset, length)
    directory = _central_directory(record)
    if directory is None:
        return None
    listed, end = directory  # entries' bytes end where the central directory starts
    entries = {name.split("/", 1)[-1]: entry for name, entry in listed.items()}
    if (len({name.split("/", 1)[0] for name in listed}) != 1 or len(entries) != len(listed)
            or not {"data.pkl", "byteorder", "data/0"} <= entries.keys()
            or any(k.startswith("data/") and k != "data/0" for k in entries)):
        return None
    pkl, order, payload = entries["data.pkl"], entries["byteorder"], entries["data/0"]
    if pkl.size > MAX_PICKLE_BYTES or order.size > 16:
        return None
    if _entry_bytes(record, order, end) != b"little":
        return None
    pickled = _entry_bytes(record, pkl, end)
    parsed = None if pickled is None else parse_tensor_pickle(pickled)
    if (parsed is None or parsed.storage_key != "0" or parsed.location != "cpu"
            or _storage_dtypes().get(parsed.storage_type) != dtype or parsed.storage_offset != 0
            or parsed.size != size or parsed.storage_numel != math.prod(size)
            or not _contiguous(parsed.size, parsed.stride)
            or payload.size != math.prod(size) * dtype.itemsize):
        return None
    start = _entry_start(record, payload, end)
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
