"""Save or load row- and column-sharded DTensors with DCP, for the direct-read tests.

`save`: every rank saves `rows` (Shard(0)) and `cols` (Shard(1)) of known full tensors; rank 0
also writes the full tensors to `<out>/full.pt`.
`load`: every rank loads them, sharded the same way over its own world size, through igniter-dist's
safe reader, checks its shards bitwise and writes `rank<r>.json` with the reader's direct-read count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from igniter_dist.checkpoint.safe_load import SafeLoadPlanner, safe_reader
from igniter_dist.checkpoint.storage import fsspec_io
from igniter_dist.runtime import exit_process, init_runtime, shutdown_runtime


def full_tensors() -> dict[str, torch.Tensor]:
    return {"rows": torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5) / 7,
            "cols": torch.arange(4 * 12, dtype=torch.int64).reshape(4, 12) * 3}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rt = init_runtime("cpu")
    try:
        mesh = init_device_mesh("cpu", (rt.world_size,))
        full = full_tensors()
        placements = {"rows": [Shard(0)], "cols": [Shard(1)]}
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


if __name__ == "__main__":
    exit_process(main(), distributed=True)
