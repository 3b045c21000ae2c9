"""Loads that read tensor bytes straight into the live tensors: bitwise results, the fast path
really taken, damaged records refused or left to DCP, resharded loads."""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_checkpoint import assert_loads_here, fresh_objects, worker
from torch import nn

import launch
from igniter_dist.checkpoint import CheckpointManager, direct_read
from igniter_dist.checkpoint.direct_read import parse_tensor_pickle, read_into
from igniter_dist.checkpoint.layout import step_dirname
from igniter_dist.checkpoint.safe_load import SafeLoadPlanner, safe_reader
from igniter_dist.checkpoint.storage import fsspec_io
from igniter_dist.errors import CheckpointError
from igniter_dist.runtime import Runtime

SHARDED_WORKER = Path(__file__).parent / "workers" / "sharded_dcp_worker.py"
DIRECT_LOG = re.compile(r"read (\d+) tensors straight into their destinations, (\d+) items through DCP")


def objects(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def tensors_of(state) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    for i, st in state["optimizer"].state_dict()["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in st.items()})
    return out


def direct_counts(caplog) -> tuple[int, int]:
    """(tensors read directly, items left to DCP) summed over the load's debug lines."""
    found = [DIRECT_LOG.search(r.getMessage()) for r in caplog.records]
    pairs = [(int(m[1]), int(m[2])) for m in found if m]
    assert pairs, "the load logged no direct-read summary"
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def distcp_path(url: str, step: int) -> Path:
    return Path(url) / step_dirname(step) / "__0_0.distcp"


def saved_records(url: str, step: int):
    """fqn -> (offset, length) of each tensor record in the step's only .distcp file."""
    md = pickle.loads((Path(url) / step_dirname(step) / ".metadata").read_bytes())  # our own file
    return {idx.fqn: (info.offset, info.length) for idx, info in md.storage_data.items() if idx.offset is not None}


def test_manager_load_reads_model_and_optimizer_tensors_directly_and_bitwise(tmp_path, caplog):
    url = str(tmp_path / "ck")
    saved = objects(seed=0)
    assert CheckpointManager(url, Runtime()).save(1, saved, per_rank={"cursor": 1}, manifest={})
    state = objects(seed=1)
    live = tensors_of(state)
    assert not all(torch.equal(live[k], v) for k, v in tensors_of(saved).items())
    with caplog.at_level(logging.DEBUG, logger="igniter_dist.checkpoint.direct_read"):
        CheckpointManager(url, Runtime()).load(1, state)
    direct, _ = direct_counts(caplog)
    assert direct >= len(live) == 4 + 3 * 4  # weights, biases; Adam's exp_avg, exp_avg_sq, step each
    for k, v in tensors_of(saved).items():
        assert torch.equal(tensors_of(state)[k], v), k
    for k, v in tensors_of(state).items():
        assert v.data_ptr() == live[k].data_ptr(), f"{k} was replaced, not loaded in place"


def dcp_roundtrip(tmp_path, saved: dict, template: dict):
    FsspecWriter, _ = fsspec_io()
    url = str(tmp_path / "dcp")
    dcp.save(saved, storage_writer=FsspecWriter(url, sync_files=False), no_dist=True)
    reader = safe_reader(url)
    dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return reader


def test_dtypes_shapes_and_layouts_direct_or_through_dcp(tmp_path):
    saved: dict[str, Any] = {
        "f32": torch.randn(5, 7), "bf16": torch.randn(33).to(torch.bfloat16), "f16": torch.randn(2, 3, 4).half(),
        "i64": torch.arange(6), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "c64": torch.randn(3, dtype=torch.complex64),
        "stored_transposed": torch.randn(4, 3).t(),  # bytes not in row-major order: DCP's path
        "into_transposed": torch.randn(3, 4),  # destination not contiguous: DCP's path
        "into_other_dtype": torch.randn(3),
        "value": {"lr": 0.5},
    }
    template: dict[str, Any] = {k: torch.zeros_like(v, memory_format=torch.contiguous_format)
                                for k, v in saved.items() if isinstance(v, torch.Tensor)}
    template["into_transposed"] = torch.zeros(4, 3).t()
    template["into_other_dtype"] = torch.zeros(3, dtype=torch.float64)
    template["value"] = {"lr": 0.0}
    reader = dcp_roundtrip(tmp_path, saved, template)
    assert reader.direct_reads == 7
    for k, v in saved.items():
        if k == "into_other_dtype":
            assert torch.equal(template[k], v.double())
        elif isinstance(v, torch.Tensor):
            assert torch.equal(template[k], v) and template[k].dtype == v.dtype, k
    assert template["value"] == {"lr": 0.5}


def dcp_plain_load(url: str, template: dict) -> None:
    """Load with DCP's own reader and planner: the reference the direct reads must match."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    _, FsspecReader = fsspec_io()
    dcp.load(template, storage_reader=FsspecReader(url), planner=DefaultLoadPlanner(), no_dist=True)


def assert_same_as_dcp(url: str, template: dict, direct: bool = True) -> int:
    """Load `url` into a copy of `template` through igniter-dist's reader and into another through
    DCP's own; every tensor must be bitwise equal with the same dtype. Returns the direct reads."""
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in template.items()}
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in template.items()}
    reader = safe_reader(url, direct=direct)
    dcp.load(ours, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    dcp_plain_load(url, theirs)
    for k, v in theirs.items():
        if isinstance(v, torch.Tensor):
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
            assert torch.equal(_raw(ours[k]), _raw(v)), k
        else:
            assert ours[k] == v, k
    return reader.direct_reads


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaNs compare equal too."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def test_direct_reads_equal_dcps_reader_on_every_dtype_and_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(6, 5, generator=g)
    floats[0, 0] = float("nan")
    saved: dict[str, Any] = {
        "f32": floats, "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "bf16": torch.randn(33, generator=g).to(torch.bfloat16), "f16": torch.randn(2, 3, 4, generator=g).half(),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "i16": torch.randint(-999, 999, (4,), generator=g, dtype=torch.int16),
        "i32": torch.randint(-999, 999, (2, 2), generator=g, dtype=torch.int32), "i64": torch.arange(6),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "c128": torch.randn(2, generator=g, dtype=torch.complex128),
        "stored_transposed": torch.randn(4, 3, generator=g).t(),
        "stored_slice": torch.arange(20.0)[5:12],  # a view into a bigger storage
        "into_transposed": torch.randn(3, 4, generator=g),
        "into_other_dtype": torch.randn(3, generator=g),
        "value": {"lr": 0.5, "betas": (0.9, 0.99)},
    }
    template: dict[str, Any] = {k: torch.zeros_like(v, memory_format=torch.contiguous_format)
                                for k, v in saved.items() if isinstance(v, torch.Tensor)}
    template["into_transposed"] = torch.zeros(4, 3).t()
    template["into_other_dtype"] = torch.zeros(3, dtype=torch.float64)
    template["value"] = {"lr": 0.0, "betas": (0.0, 0.0)}
    url = str(tmp_path / "dcp")
    FsspecWriter, _ = fsspec_io()
    dcp.save(saved, storage_writer=FsspecWriter(url, sync_files=False), no_dist=True)
    # Direct: every dtype, and the slice (DCP writes a copy of it); the other layouts go through DCP.
    assert assert_same_as_dcp(url, template) == 14
    assert assert_same_as_dcp(url, template, direct=False) == 0


def test_direct_reads_only_on_the_torch_they_were_written_for(tmp_path, caplog):
    assert direct_read.supported()  # the pinned torch: when it moves, rerun these tests there and add it
    assert not direct_read.supported("2.14.0") and not direct_read.supported("3.0.0+cu130")
    assert direct_read.supported("2.13.1+cpu")
    url = str(tmp_path / "ck")
    assert CheckpointManager(url, Runtime()).save(1, objects(seed=0), per_rank={}, manifest={})
    state = objects(seed=1)
    with caplog.at_level(logging.DEBUG, logger="igniter_dist.checkpoint.direct_read"):
        CheckpointManager(url, Runtime(), direct_read=False).load(1, state)
    assert not [r for r in caplog.records if DIRECT_LOG.search(r.getMessage())]  # the switch: DCP read it all
    want = tensors_of(objects(seed=0))
    assert all(torch.equal(v, want[k]) for k, v in tensors_of(state).items())


def test_damaged_zip_records_give_an_error_or_a_correct_load(tmp_path, caplog):
    url = str(tmp_path / "ck")
    saved = objects(seed=0)
    assert CheckpointManager(url, Runtime()).save(1, saved, per_rank={"cursor": 1}, manifest={})
    path = distcp_path(url, 1)
    pristine = path.read_bytes()
    offset, length = saved_records(url, 1)["model.0.weight"]
    record = pristine[offset:offset + length]
    name = b"/data/0"
    cd = record.rindex(b"PK\x01\x02", 0, record.rindex(name))  # data/0's central directory entry

    def load_damaged(data: bytes) -> dict[str, torch.Tensor] | None:
        path.write_bytes(data)
        state = objects(seed=1)
        caplog.clear()
        try:
            with caplog.at_level(logging.DEBUG, logger="igniter_dist.checkpoint.direct_read"):
                CheckpointManager(url, Runtime()).load(1, state)
        except CheckpointError as e:
            assert str(path.parent) in str(e), e
            return None
        return tensors_of(state)

    want = tensors_of(saved)
    assert load_damaged(pristine) is not None
    pristine_direct, _ = direct_counts(caplog)
    damages = {
        # the stored sizes of data/0 in the central directory, doubled
        "sizes": lambda r: r[:cd + 20] + struct.pack("<II", 2 * 64 * 4, 2 * 64 * 4) + r[cd + 28:],
        # the local header's method field says deflate
        "method": lambda r: _patch_local_header(r, name, 8, struct.pack("<H", 8)),
        # the record's byteorder entry says big
        "byteorder": lambda r: r.replace(b"little", b"bigxxx", 1),
        # the pickle's storage element count grows (BININT1 64 -> 65)
        "numel": lambda r: r.replace(b"cpuq\x04K@", b"cpuq\x04KA", 1),
        # the end record counts one entry more than the central directory holds
        "entries": lambda r: r[:-14] + struct.pack("<HH", 8, 8) + r[-10:],
        # the end record puts the central directory 16 bytes later
        "directory": lambda r: r[:-6] + struct.pack("<I", struct.unpack("<I", r[-6:-2])[0] + 16) + r[-2:],
    }
    for label, damage in damages.items():
        damaged = damage(record)
        assert damaged != record and len(damaged) == len(record), label
        got = load_damaged(pristine[:offset] + damaged + pristine[offset + length:])
        if got is not None:  # DCP's own path read it: then it must be exactly right
            assert all(torch.equal(got[k], v) for k, v in want.items()), label
            direct, _ = direct_counts(caplog)
            assert direct == pristine_direct - 1, label  # this one record went through DCP
    # A truncated file never loads.
    assert load_damaged(pristine[: offset + length // 2]) is None
    assert load_damaged(pristine[: len(pristine) - 10]) is None


def _patch_local_header(record: bytes, name: bytes, field: int, value: bytes) -> bytes:
    at = record.rindex(b"PK\x03\x04", 0, record.index(name)) + field
    return record[:at] + value + record[at + len(value):]


def test_a_short_read_is_a_checkpoint_error_naming_the_file(tmp_path):
    f = tmp_path / "short.distcp"
    f.write_bytes(bytes(range(100)))
    dest = torch.zeros(10, dtype=torch.float32)
    with open(f, "rb") as stream, pytest.raises(CheckpointError, match=r"short\.distcp ends 8 bytes early"):
        read_into(stream, 68, dest, str(f))
    with open(f, "rb") as stream:
        read_into(stream, 60, dest, str(f))
    assert dest.view(torch.uint8).tolist() == list(range(60, 100))


def test_tensor_pickles_are_parsed_not_run():
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save(torch.zeros(3, 4), buf)
    pkl = next(zipfile.ZipFile(buf).read(n) for n in zipfile.ZipFile(buf).namelist() if n.endswith("data.pkl"))
    record = parse_tensor_pickle(pkl)
    assert record is not None and (record.storage_type, record.storage_numel) == ("FloatStorage", 12)
    assert (record.size, record.stride, record.storage_offset) == ((3, 4), (4, 1), 0)
    assert parse_tensor_pickle(pickle.dumps(print)) is None
    assert parse_tensor_pickle(pickle.dumps(("tensor", 1))) is None
    assert parse_tensor_pickle(pkl[:-3]) is None


def test_resharded_loads_read_whole_chunks_directly(tmp_path, caplog):
    # A 2-rank DDP save loaded on one process: replicated tensors, whole chunks.
    url = str(tmp_path / "ddp")
    expect = tmp_path / "expect"
    expect.mkdir()
    launch.check(worker("save", url, expect, "--steps", "1"))
    with caplog.at_level(logging.DEBUG, logger="igniter_dist.checkpoint.direct_read"):
        assert_loads_here(url, 1, expect)
    direct, _ = direct_counts(caplog)
    assert direct >= 4 + 3 * 4

    # Row- and column-sharded DTensors saved on 2 ranks, loaded on 1 into plain tensors: whole row
    # chunks land in contiguous row ranges (direct); column chunks do not (DCP's path).
    sharded = str(tmp_path / "sharded")
    out = tmp_path / "out"
    out.mkdir()
    launch.check(launch.torchrun(SHARDED_WORKER, ["save", "--url", sharded, "--out", str(out)], nproc=2,
                                 timeout=240))
    full = torch.load(out / "full.pt", weights_only=True)
    template = {k: torch.zeros_like(v) for k, v in full.items()}
    reader = safe_reader(sharded)
    dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    assert all(torch.equal(template[k], v) for k, v in full.items())
    assert reader.direct_reads == 2
    assert assert_same_as_dcp(sharded, {k: torch.zeros_like(v) for k, v in full.items()}) == 2
    ddp_template = {f"model.{k}": torch.zeros_like(v) for k, v in fresh_objects()["model"].state_dict().items()}
    assert assert_same_as_dcp(f"{url}/{step_dirname(1)}", ddp_template) == len(ddp_template)

    # ... and on 3 ranks as 3 shards: every read narrows a stored chunk (DCP's path), still bitwise.
    launch.check(launch.torchrun(SHARDED_WORKER, ["load", "--url", sharded, "--out", str(out)], nproc=3,
                                 timeout=240))
    counts = [json.loads((out / f"rank{r}.json").read_text())["direct_reads"] for r in range(3)]
    assert counts == [0, 0, 0]
