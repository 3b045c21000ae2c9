"""The local load plan (igniter_dist/checkpoint/load_plan.py) against DCP's own: item for item, on
plain tensors in one process and on DTensors of awkward layouts over 2 gloo ranks, for templates in
the saved layout (whole-chunk reads into the live tensors) and in others (DCP's resharding reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

import launch
from igniter_dist.checkpoint.load_plan import local_load_plan
from igniter_dist.checkpoint.safe_load import SafeLoadPlanner, load_metadata, safe_reader

WORKER = Path(__file__).parent / "workers" / "sharded_dcp_worker.py"


def saved(tmp_path: Path) -> tuple[str, dict[str, Any], Metadata]:
    state = {"w": torch.randn(4, 3), "b": torch.arange(3.0), "step": torch.tensor(7), "note": "text"}
    url = str(tmp_path / "ckpt")
    dcp.save(state, checkpoint_id=url, no_dist=True)
    with open(Path(url, ".metadata"), "rb") as f:
        return url, state, load_metadata(f, url)


def same_plans(template: dict[str, Any], metadata: Metadata, strict: bool = True) -> dict:
    ours, destinations = local_load_plan(template, metadata, strict)
    theirs = create_default_local_load_plan(template, metadata, strict)
    assert ours.items == theirs.items
    assert [(i.dest_index.index, i.storage_index.index) for i in ours.items] == \
        [(i.dest_index.index, i.storage_index.index) for i in theirs.items]
    return destinations


def test_whole_tensors_read_into_themselves(tmp_path):
    url, state, metadata = saved(tmp_path)
    template: dict[str, Any] = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "step": torch.tensor(0), "note": None}
    destinations = same_plans(template, metadata)
    assert {i.fqn for i in destinations} == {"w", "b", "step"}
    assert all(t is template[i.fqn] for i, t in destinations.items())

    dcp.load(template, storage_reader=safe_reader(url), planner=SafeLoadPlanner(), no_dist=True)
    assert all(torch.equal(template[k], state[k]) for k in ("w", "b", "step")) and template["note"] == "text"


def test_mismatches_fail_as_dcp_fails(tmp_path):
    _, _, metadata = saved(tmp_path)
    with pytest.raises(ValueError, match="Size mismatch"):
        local_load_plan({"w": torch.zeros(3, 4)}, metadata)
    with pytest.raises(RuntimeError, match="Missing key"):
        local_load_plan({"absent": torch.zeros(1)}, metadata)
    assert {i.fqn for i in same_plans({"w": torch.zeros(4, 3), "absent": torch.zeros(1)}, metadata,
                                      strict=False)} == {"w"}


def test_dtensor_plans_equal_dcps_in_every_layout(tmp_path):
    url, out = tmp_path / "awkward", tmp_path / "out"
    out.mkdir()
    launch.check(launch.torchrun(WORKER, ["plans", "--url", str(url), "--out", str(out)], nproc=2, timeout=240))
    reports = [json.loads((out / f"plans{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert all(r["same"] and r["live"] for r in report.values()), (rank, report)
    # Same layout: every non-empty local shard is one whole stored chunk. Rank 1's shard of the
    # one-row tensor is empty: DCP reads nothing for it, and neither do we.
    assert [r["same"]["whole"] for r in reports] == [4, 3]
    # Other layouts: only the tensors whose local chunk is still a stored chunk read whole.
    for layout in ("other", "plain"):
        assert all(0 < r[layout]["whole"] < r[layout]["items"] for r in reports), layout


def test_overlapping_and_empty_stored_chunks_are_left_to_dcp():
    """Metadata DCP itself does not write, built by hand: a stored chunk equal to the live tensor
    but overlapped by another (both must be read), and an empty chunk (nothing to read)."""
    props = TensorProperties(dtype=torch.float32)
    metadata = Metadata(state_dict_metadata={
        "overlapped": TensorStorageMetadata(props, torch.Size([6]), [
            ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([6])),
            ChunkStorageMetadata(offsets=torch.Size([2]), sizes=torch.Size([2]))]),
        "empty": TensorStorageMetadata(props, torch.Size([0, 3]), [
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([0, 3]))]),
    })
    template = {"overlapped": torch.zeros(6), "empty": torch.zeros(0, 3)}
    assert same_plans(template, metadata) == {}
    assert {i.storage_index.index for i in create_default_local_load_plan(template, metadata).items} == {0, 1}
