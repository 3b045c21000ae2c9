"""One torchrun job: the GPT example's transformer under ddp and fsdp side by side, then fsdp checkpoints.

Per rank: bytes of parameters, gradients and Adam state (after a backward, before the optimizer
step, when all three exist); step time in interleaved rounds (ddp and fsdp take turns going
first); sharded save and load through the checkpoint manager against a plain write and read of
the same bytes (this rank's shards), timed barrier to barrier as in benchmarks/checkpoint, on a wider
model than the one trained. Reads are timed twice: from the page cache (the files were just written)
and from the disk (the files dropped from the cache with posix_fadvise first).

    torchrun --nproc-per-node 2 benchmarks/sharding/worker.py --url runs/bench/scratch/sharding --out x.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "examples" / "gpt"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from checkpoint.worker import Timer, read_buffer  # noqa: E402
from harness import write_json  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from igniter_dist.checkpoint import CheckpointManager  # noqa: E402
from igniter_dist.parallel.fsdp import ShardingOptions, shard  # noqa: E402
from igniter_dist.runtime import Runtime, init_runtime, shutdown_runtime  # noqa: E402

STRATEGIES = ("ddp", "fsdp")


def wrapped(config: GPTConfig, strategy: str, rt: Runtime) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(config)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model) if rt.distributed else model
    return shard(model, rt, "fsdp", ShardingOptions())


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state."""
    params = list(model.parameters())
    moments = [v for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    return {"params": sum(local(p).nbytes for p in params),
            "grads": sum(local(p.grad).nbytes for p in params if p.grad is not None),
            "optimizer": sum(local(v).nbytes for v in moments)}


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="Sequences per rank and step.")
    p.add_argument("--steps", type=int, default=6, help="Timed steps per strategy and round.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ckpt-layers", type=int, default=4, help="Layers of the model the checkpoint part saves.")
    p.add_argument("--ckpt-width", type=int, default=1024,
                   help="Its width: 4 x 1024 is 50M parameters, 600 MB with Adam's moments, so per-tensor costs "
                        "do not hide the bandwidth.")
    p.add_argument("--reps", type=int, default=3, help="Timed save/load repetitions, after one warm-up.")
    p.add_argument("--url", required=True, help="A local folder, empty or absent.")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    rt = init_runtime("cpu")
    config = GPTConfig(block_size=args.block, n_layer=args.layers, n_head=max(1, args.width // 64), n_embd=args.width)
    models = {s: wrapped(config, s, rt) for s in STRATEGIES}
    optimizers = {s: torch.optim.Adam(m.parameters(), lr=3e-4) for s, m in models.items()}
    data = torch.Generator().manual_seed(1 + rt.rank)

    def step(strategy: str, measure: bool = False) -> dict[str, int]:
        model, optimizer = models[strategy], optimizers[strategy]
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.block + 1), generator=data)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1)).backward()
        sizes = state_bytes(model, optimizer) if measure else {}
        optimizer.step()
        optimizer.zero_grad()
        return sizes

    memory = {}
    for s in STRATEGIES:
        step(s)  # Adam's moments exist from here on
        memory[s] = step(s, measure=True)
    times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for r in range(args.rounds):
        for s in STRATEGIES if r % 2 == 0 else tuple(reversed(STRATEGIES)):
            step(s)  # warm-up after the other strategy ran
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(s)
                times[s].append(time.perf_counter() - t0)

    parameters = sum(p.numel() for p in models["ddp"].parameters())
    models.clear()  # free the training models before the bigger one
    optimizers.clear()
    big = GPTConfig(block_size=args.block, n_layer=args.ckpt_layers, n_head=max(1, args.ckpt_width // 64),
                    n_embd=args.ckpt_width)
    model = wrapped(big, "fsdp", rt)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # Adam's moments now exist
    state = {"model": model, "optimizer": optimizer}
    mine = [local(t).detach() for t in (*model.parameters(), *(v for st in optimizer.state.values()
                                                                for v in st.values() if isinstance(v, torch.Tensor)))]
    mine_bytes = sum(t.nbytes for t in mine)
    url = args.url.rstrip("/")
    plain_root = Path(url) / "plain"
    manager = CheckpointManager(f"{url}/sharded", rt, n_saved=2)
    timer = Timer(rt.distributed, settle=True)
    buffer = read_buffer(mine_bytes)

    def plain_write(rep: int) -> None:
        with open(plain_root / f"{rep}-rank{rt.rank}.bin", "wb") as f:
            for t in mine:
                f.write(t.contiguous().numpy().data)
            f.flush()
            os.fsync(f.fileno())

    def plain_read(rep: int) -> None:  # into memory that exists already, as DCP loads into the live shards
        with open(plain_root / f"{rep}-rank{rt.rank}.bin", "rb", buffering=0) as f:
            f.readinto(buffer)

    if rt.is_main:
        plain_root.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    for rep in range(args.reps + 1):  # repetition 0 warms up and is dropped
        writes: list[tuple[str, Callable[[], object]]] = [
            ("plain_write_s", partial(plain_write, rep)),
            ("save_s", partial(manager.save, rep, state, per_rank={}, manifest={}))]
        reads: list[tuple[str, Callable[[], object]]] = [
            ("plain_read_s", partial(plain_read, rep)), ("load_s", partial(manager.load, rep, state))]
        if rep % 2:
            writes.reverse()
            reads.reverse()
        for name, op in writes:
            timer.time(name, op)
            manager.wait()
        for name, op in reads:
            timer.time(name, op)
        # The same reads from the disk, as a resume in a fresh process or on another machine makes.
        cold: list[tuple[str, Callable[[], object]]] = [
            ("plain_read_cold_s", partial(plain_read, rep)), ("load_cold_s", partial(manager.load, rep, state))]
        for name, op in cold[::-1] if rep % 2 else cold:
            evict([plain_root / f"{rep}-rank{rt.rank}.bin", *Path(manager.url_of(rep)).iterdir()])
            timer.time(name, op)
        if rep == 0:
            timer.results.clear()
    manager.close()
    everyone: list[Any] = rt.all_gather_object({"memory": memory, "shard_bytes": mine_bytes})
    if rt.is_main:
        write_json(args.out, {
            "world_size": rt.world_size, "config": vars(args), "parameters": parameters,
            "ckpt_parameters": sum(p.numel() for p in model.parameters()),
            "ranks": everyone, "median_step_s": {s: statistics.median(v) for s, v in times.items()},
            "step_s": times, "checkpoint": timer.results})
    shutdown_runtime()


if __name__ == "__main__":
    main()
