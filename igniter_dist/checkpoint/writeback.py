"""Early writeback: a local checkpoint file goes to disk while the rest of it is still being written.

A save ends with an fsync of each rank's file, and Linux only starts writing dirty pages back once
about a tenth of memory is dirty or they are 30 s old, so without help the disk sits idle while
DCP serializes and then the fsync writes the whole shard. Asking the kernel to start writeback of
every completed stretch (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait) overlaps
the two; the final fsync still waits for every byte, so nothing about durability changes.

Only where libc has `sync_file_range` (Linux); elsewhere files are written as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from typing import Any

STRETCH_BYTES = 16 << 20  # how much is written before its writeback starts
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, or None where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # no such libc call, or no C library to open
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    return _sync_file_range() is not None


class WritebackStream:
    """A writable file that starts the writeback of each `STRETCH_BYTES` written; everything else
    (tell, fileno, flush, close) goes to the file it wraps."""

    def __init__(self, stream: Any, start_writeback: Callable[[int, int, int, int], int]):
        self._stream = stream
        self._start_writeback = start_writeback
        self._fd = stream.fileno()
        self._written = 0  # bytes written through this wrapper
        self._started = 0  # bytes whose writeback has been asked for

    def write(self, data: Any) -> int:
        n: int = self._stream.write(data)
        self._written += n
        if self._written - self._started >= STRETCH_BYTES:
            self._stream.flush()  # the bytes must be in the page cache, not in Python's buffer
            if self._start_writeback(self._fd, self._started, self._written - self._started,
                                     _SYNC_FILE_RANGE_WRITE) != 0:
                self._start_writeback = _no_writeback  # the final fsync does it all, as before
            self._started = self._written
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _no_writeback(fd: int, offset: int, nbytes: int, flags: int) -> int:
    return 0


def start_writeback_early(writer: Any) -> Any:
    """`writer` (a DCP FileSystemWriter on a local disk), its data files now written back early."""
    writer.fs = WritebackFileSystem(writer.fs)
    return writer


class WritebackFileSystem:
    """DCP's filesystem adapter, whose write streams start their writeback early."""

    def __init__(self, fs: Any):
        self._fs = fs

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        start_writeback = _sync_file_range()
        with self._fs.create_stream(path, mode) as stream:
            if start_writeback is None or "w" not in mode:
                yield stream
            else:
                yield WritebackStream(stream, start_writeback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)
