"""One torchrun job: checkpoint a model + Adam state with igniter-dist and write/read the same bytes plainly.

Every measurement starts and ends at a barrier, so it is the slowest rank's time; rank 0 writes
the results. Within each repetition: plain write and sync save (taking turns at going first),
async save, plain read and load (taking turns), resume; so drift and the page cache hit them alike.

    torchrun --nproc-per-node 2 benchmarks/checkpoint/worker.py --url runs/bench/scratch/ckpt --out x.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from harness import write_json
from torch import nn

from igniter_dist.checkpoint import CheckpointManager
from igniter_dist.runtime import init_runtime, shutdown_runtime
from igniter_dist.wrapping import prepare, unwrap

LAYERS = 4


def width_of(megabytes: float) -> int:
    """The layer width at which the parameters plus Adam's two moments take about `megabytes` of float32."""
    return int(math.sqrt(megabytes * 1e6 / (3 * 4 * LAYERS)))


def model_of(megabytes: float) -> nn.Module:
    """An MLP whose parameters plus Adam's two moments take about `megabytes` of float32."""
    width = width_of(megabytes)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(LAYERS)))


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(unwrap(model).state_dict().values())
    for s in optimizer.state.values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


def my_share(tensors: list[torch.Tensor], rank: int, world_size: int) -> list[torch.Tensor]:
    """Split the tensors between ranks, largest first to the least loaded (as DCP balances replicated state)."""
    load = [0] * world_size
    mine = []
    for t in sorted(tensors, key=lambda t: -t.nbytes):
        r = load.index(min(load))
        load[r] += t.nbytes
        if r == rank:
            mine.append(t)
    return mine


def read_buffer(nbytes: int) -> memoryview:
    """A plain read's destination of `nbytes`, allocated like the live tensors a load fills (torch's
    allocator: 64-byte aligned, huge pages where the kernel allows) and touched once.

    Not a `bytearray`: the kernel copies page-cache bytes into malloc's memory about 3x slower here
    (304 MB: 0.188 s into a bytearray or numpy array, 0.059 s into a torch tensor or an anonymous
    mmap, median of 7 in one process on this 2-core EPYC), which made plain reads look slower
    than loads that fill torch tensors.
    """
    return torch.zeros(nbytes, dtype=torch.uint8).numpy().data


class Timer:
    """Barrier-to-barrier timings by name, so each is the slowest rank's time.

    Before each timed operation on a local disk, the write-back of earlier ones is flushed
    (`os.sync`, untimed): otherwise a write that follows another inherits its dirty pages and one
    that follows reads finds an idle disk, and the order decides the result.
    """

    def __init__(self, distributed: bool, settle: bool):
        self.distributed = distributed
        self.settle = settle
        self.results: dict[str, list[float]] = {}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def start(self) -> float:
        if self.settle:
            os.sync()
        self.barrier()
        return time.perf_counter()

    def time(self, name: str, fn: Callable[[], object]) -> None:
        t0 = self.start()
        fn()
        self.barrier()
        self.results.setdefault(name, []).append(time.perf_counter() - t0)

    def record_max(self, name: str, seconds: float) -> None:
        """A per-rank duration (no barrier inside it), reduced to the slowest rank's."""
        t = torch.tensor([seconds], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.results.setdefault(name, []).append(float(t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="A local folder or s3://bucket/prefix, empty or absent.")
    p.add_argument("--megabytes", type=float, default=200.0)
    p.add_argument("--reps", type=int, default=3, help="Timed repetitions, after one warm-up.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--direct-read", choices=["true", "false"], default="true",
                   help="false: load every tensor through DCP's own reader (CheckpointManager(direct_read=False)).")
    args = p.parse_args()
    direct = args.direct_read == "true"

    rt = init_runtime("cpu")
    torch.manual_seed(0)
    model = prepare(model_of(args.megabytes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, width_of(args.megabytes))).sum().backward()
    optimizer.step()  # Adam's moments now exist
    state = {"model": model, "optimizer": optimizer}
    tensors = state_tensors(model, optimizer)
    total_bytes = sum(t.nbytes for t in tensors)
    mine = my_share(tensors, rt.rank, rt.world_size)

    url = args.url.rstrip("/")
    local = "://" not in url
    fs = plain_fs(url)
    plain_root = f"{url}/plain"
    sync = CheckpointManager(f"{url}/sync", rt, n_saved=2, direct_read=direct)
    background = CheckpointManager(f"{url}/async", rt, n_saved=2, async_save=True)
    timer = Timer(rt.distributed, settle=local)
    mine_bytes = None if local else b"".join(t.numpy().tobytes() for t in mine)  # pipe takes bytes
    # Read buffers, allocated and touched once: DCP loads into the live tensors, so plain reads do too.
    buffers = [read_buffer(sum(t.nbytes for t in my_share(tensors, r, rt.world_size))) for r in range(rt.world_size)]

    def plain_write(rep: int) -> None:
        path = f"{plain_root}/{rep}/rank{rt.rank}.bin"
        if local:
            with open(path, "wb") as f:
                for t in mine:
                    f.write(t.numpy().data)
                f.flush()
                os.fsync(f.fileno())
        else:
            fs.pipe_file(path, mine_bytes)

    def plain_read(rep: int) -> None:
        # Every rank reads the whole state, as every DDP rank loads every replicated tensor, into
        # buffers that exist already (DCP, too, loads into the live tensors).
        for r in range(rt.world_size):
            path = f"{plain_root}/{rep}/rank{r}.bin"
            if local:
                with open(path, "rb", buffering=0) as f:
                    f.readinto(buffers[r])
            else:
                fs.cat_file(path)

    def plain_read_new(rep: int) -> None:
        """`f.read()`: every rank reads every file into fresh memory (what a plain loader without buffers does)."""
        for r in range(rt.world_size):
            with open(f"{plain_root}/{rep}/rank{r}.bin", "rb") as f:
                f.read()

    def async_save(step: int) -> None:
        t0 = timer.start()
        background.save(step, state, per_rank={}, manifest={})
        blocked = time.perf_counter() - t0
        background.wait()
        timer.barrier()
        timer.record_max("async_blocking_s", blocked)
        timer.results.setdefault("async_total_s", []).append(time.perf_counter() - t0)

    for rep in range(args.reps + 1):  # repetition 0 warms up (connections, allocations) and is dropped
        if rt.is_main and local:
            os.makedirs(f"{plain_root}/{rep}", exist_ok=True)
        writes: list[tuple[str, Callable[[], object]]] = [
            ("plain_write_s", partial(plain_write, rep)),
            ("save_s", partial(sync.save, rep, state, per_rank={}, manifest={}))]
        reads: list[tuple[str, Callable[[], object]]] = [
            ("plain_read_s", partial(plain_read, rep)), ("load_s", partial(sync.load, rep, state))]
        if rep % 2:  # alternate which goes first: the page cache and the disk's write-back favour one order
            writes.reverse()
            reads.reverse()
        for name, op in writes:
            timer.time(name, op)
            sync.wait()  # untimed: rank 0's background deletion of old checkpoints, which training overlaps
        async_save(rep)
        for name, op in reads:
            timer.time(name, op)
        if local:
            timer.time("plain_read_new_s", partial(plain_read_new, rep))
        timer.time("resume_s", partial(sync.load_latest, state))  # what a restart does: find latest, load
        if rt.is_main:
            fs.rm(f"{plain_root}/{rep}", recursive=True)
        if rep == 0:
            timer.results.clear()
    sync.close()
    background.close()
    if rt.is_main:
        write_json(args.out, {"url": url, "world_size": rt.world_size, "state_bytes": total_bytes,
                              "reps": args.reps, "direct_read": direct, "results": timer.results})
    shutdown_runtime()


def plain_fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)[0]


if __name__ == "__main__":
    main()
