"""Early writeback of local checkpoint files: every stretch's writeback is asked for once, in order,
over bytes already in the file; a refusal falls back to the final fsync; saves load back bitwise."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch
from test_checkpoint_direct_read import objects, tensors_of

from igniter_dist.checkpoint import CheckpointManager, writeback
from igniter_dist.checkpoint.layout import step_dirname
from igniter_dist.checkpoint.writeback import STRETCH_BYTES, WritebackStream
from igniter_dist.runtime import Runtime

MIB = 1 << 20


class Recorder:
    """Stands for sync_file_range: records each call and what the file held at that moment."""

    def __init__(self, result: int = 0):
        self.calls: list[tuple[int, int, int]] = []
        self.sizes_then: list[int] = []
        self.result = result

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        self.calls.append((offset, nbytes, flags))
        self.sizes_then.append(os.fstat(fd).st_size)
        return self.result


def test_each_stretch_starts_its_writeback_once_after_it_reached_the_file(tmp_path):
    path = tmp_path / "f.bin"
    chunk = os.urandom(3 * MIB)
    recorder = Recorder()
    with open(path, "wb") as f:
        stream = WritebackStream(f, recorder)
        for _ in range(20):  # 60 MiB
            assert stream.write(chunk) == len(chunk)
        assert stream.tell() == 60 * MIB  # everything else is the wrapped file's
    assert path.read_bytes() == chunk * 20
    offsets = [offset for offset, _, _ in recorder.calls]
    ends = [offset + n for offset, n, _ in recorder.calls]
    assert offsets == [0, *ends[:-1]], "stretches overlap or leave gaps"
    assert all(n >= STRETCH_BYTES and n < STRETCH_BYTES + len(chunk) for _, n, _ in recorder.calls)
    assert ends == [18 * MIB, 36 * MIB, 54 * MIB]  # the last 6 MiB are left to the final fsync
    assert all(flags == 2 for _, _, flags in recorder.calls)  # SYNC_FILE_RANGE_WRITE: start, do not wait
    flushed = zip(recorder.sizes_then, ends, strict=True)
    assert all(size >= end for size, end in flushed), "writeback asked for bytes still in Python's buffer"


def test_a_refused_writeback_is_not_asked_again_and_loses_nothing(tmp_path):
    path = tmp_path / "f.bin"
    recorder = Recorder(result=-1)
    with open(path, "wb") as f:
        stream = WritebackStream(f, recorder)
        for i in range(10):
            stream.write(bytes([i]) * (8 * MIB))
    assert len(recorder.calls) == 1
    assert path.read_bytes() == b"".join(bytes([i]) * (8 * MIB) for i in range(10))


@pytest.mark.skipif(not writeback.available(), reason="no sync_file_range in this libc")
def test_local_saves_start_writeback_early_and_load_back_bitwise(tmp_path, monkeypatch):
    real = writeback._sync_file_range()
    assert real is not None
    calls: list[tuple[int, int]] = []

    def recording(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes))
        result: int = real(fd, offset, nbytes, flags)
        assert result == 0, f"sync_file_range failed: {os.strerror(ctypes.get_errno())}"
        return result

    monkeypatch.setattr(writeback, "_sync_file_range", lambda: recording)
    torch.manual_seed(0)
    saved = objects(seed=0)
    big = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))  # 2 x 16 MiB
    saved["big"] = big
    url = str(tmp_path / "ck")
    assert CheckpointManager(url, Runtime()).save(1, saved, per_rank={}, manifest={})
    shard = Path(url) / step_dirname(1) / "__0_0.distcp"
    assert len(calls) >= 2, "a 32 MiB shard started its writeback fewer than twice"
    assert [offset for offset, _ in calls] == [0, *(o + n for o, n in calls[:-1])]
    assert sum(n for _, n in calls) <= shard.stat().st_size
    state = objects(seed=1)
    state["big"] = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    CheckpointManager(url, Runtime()).load(1, state)
    pairs = zip(state["big"].state_dict().values(), big.state_dict().values(), strict=True)
    assert all(torch.equal(loaded, original) for loaded, original in pairs)
    for k, v in tensors_of(saved).items():
        assert torch.equal(tensors_of(state)[k], v), k
