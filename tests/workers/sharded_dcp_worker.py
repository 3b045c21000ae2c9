"""Save or load row- and column-sharded DTensors with DCP, for the direct-read tests.

`save`: every rank saves `rows` (Shard(0)) and `cols` (Shard(1)) of known full tensors; rank 0
also writes the full tensors to `<out>/full.pt`.
`load`: every rank loads them, sharded the same way over its own world size, through igniter-dist's
safe reader, checks its shards bitwise and writes `rank<r>.json` with the reader's direct-read count.
`plans`: every rank saves DTensors of awkward layouts (uneven rows, an empty shard, replicated, 0-d)
and compares igniter-dist's local load plan with DCP's for templates in the same layout and in
others, writing `plans<r>.json`; then loads the same-layout template through igniter-dist and checks
it bitwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from igniter_dist.checkpoint.load_plan import local_load_plan
from igniter_dist.checkpoint.safe_load import SafeLoadPlanner, load_metadata, safe_reader
from igniter_dist.checkpoint.storage import fsspec_io
from igniter_dist.runtime import exit_process, init_runtime, shutdown_runtime


def full_tensors() -> dict[str, torch.Tensor]:
    return {"rows": torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5) / 7,
            "cols": torch.arange(4 * 12, dtype=torch.int64).reshape(4, 12) * 3}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load", "plans"])
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rt = init_runtime("cpu")
    try:
        mesh = init_device_mesh("cpu", (rt.world_size,))
        full = full_tensors()
        placements = {"rows": [Shard(0)], "cols": [Shard(1)]}
        if args.mode == "plans":
            return compare_plans(mesh, args.url, Path(args.out, f"plans{rt.rank}.json"))
        if args.mode == "save":
            state = {k: distribute_tensor(v, mesh, placements[k]) for k, v in full.items()}
            FsspecWriter, _ = fsspec_io()
            dcp.save(state, storage_writer=FsspecWriter(args.url, sync_files=False))
            if rt.is_main:
                torch.save(full, Path(args.out, "full.pt"))
            return 0
        state = {k: distribute_tensor(torch.zeros_like(v), mesh, placements[k]) for k, v in full.items()}
        reader = safe_reader(args.url)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        for k, v in state.items():
            assert torch.equal(v.full_tensor(), full[k]), f"{k} differs after loading on {rt.world_size} ranks"
        Path(args.out, f"rank{rt.rank}.json").write_text(json.dumps({"direct_reads": reader.direct_reads}))
        return 0
    finally:
        shutdown_runtime()


def awkward() -> dict[str, torch.Tensor]:
    """Full tensors that shard unevenly over 2 ranks: 3 rows (2 + 1), 1 row (1 + an empty shard)."""
    return {"uneven": torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4),
            "one_row": torch.arange(5, dtype=torch.float64).reshape(1, 5),
            "scalar": torch.tensor(2.5), "vector": torch.arange(8, dtype=torch.int32)}


def compare_plans(mesh, url: str, out: Path) -> int:
    full = awkward()
    saved: dict[str, list[Placement]] = {"uneven": [Shard(0)], "one_row": [Shard(0)], "scalar": [Replicate()],
                                         "vector": [Replicate()]}
    state: dict = {k: distribute_tensor(v, mesh, saved[k]) for k, v in full.items()}
    state["note"] = "a value"
    FsspecWriter, _ = fsspec_io()
    dcp.save(state, storage_writer=FsspecWriter(url, sync_files=False))
    with open(Path(url, ".metadata"), "rb") as f:
        metadata = load_metadata(f, url)
    layouts: dict[str, dict[str, list[Placement]]] = {
        "same": saved,
        "other": {"uneven": [Shard(1)], "one_row": [Replicate()], "scalar": [Replicate()], "vector": [Shard(0)]},
    }
    report: dict = {}
    for name, placements in layouts.items():
        template: dict = {k: distribute_tensor(torch.zeros_like(v), mesh, placements[k]) for k, v in full.items()}
        template["note"] = None
        report[name] = plan_report(template, metadata)
    report["plain"] = plan_report({k: torch.zeros_like(v) for k, v in full.items()}, metadata)
    report["missing_allowed"] = plan_report({"uneven": torch.zeros(3, 4), "absent": torch.zeros(2)}, metadata,
                                            strict=False)

    template = {k: distribute_tensor(torch.zeros_like(v), mesh, saved[k]) for k, v in full.items()}
    dcp.load(template, storage_reader=safe_reader(url), planner=SafeLoadPlanner())
    for k, v in template.items():
        assert torch.equal(v.full_tensor(), full[k]), f"{k} differs after loading in the layout it was saved in"
    out.write_text(json.dumps(report))
    return 0


def plan_report(template: dict, metadata, strict: bool = True) -> dict:
    """Whether our plan equals DCP's item by item (index hints too), and how many whole-chunk
    reads name the live local tensor itself as their destination."""
    ours, destinations = local_load_plan(template, metadata, strict)
    theirs = create_default_local_load_plan(template, metadata, strict)
    hints = [[(i.dest_index.index, i.storage_index.index) for i in p.items] for p in (ours, theirs)]
    live = {k: v._local_tensor if isinstance(v, DTensor) else v for k, v in template.items()}
    return {"same": ours.items == theirs.items and hints[0] == hints[1], "items": len(theirs.items),
            "whole": len(destinations),
            "live": all(t is live[i.fqn] for i, t in destinations.items())}


if __name__ == "__main__":
    exit_process(main(), distributed=True)
