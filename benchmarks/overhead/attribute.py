"""Where igniter-dist's per-iteration time goes: its loop's collaborators timed one by one.

Wraps, from outside, the calls `Engine.run` makes every iteration and prints the median
microseconds of each per iteration next to the whole framework time the StepClock measures.
A profile for explaining the overhead figure, not a benchmark to compare.

    torchrun --nproc-per-node 2 benchmarks/overhead/attribute.py [--steps 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
from harness import StepClock, timed_collectives, timed_loader_next
from impls import igniter
from workloads import WORKLOADS, RunContext

import igniter_dist.engine as engine_mod
from igniter_dist.metrics import MetricSet
from igniter_dist.signals import StopFlag
from igniter_dist.tracking.base import NullSink, Sinks

# (owner, attribute) of every call Engine.run makes once per iteration
PER_ITERATION = [
    (engine_mod, "to_device"), (engine_mod.Engine, "_call"), (engine_mod, "batch_size"), (MetricSet, "update"),
    (engine_mod.Engine, "_progress"), (Sinks, "progress"), (NullSink, "progress"),
    (engine_mod.Engine, "_time_to_save"), (StopFlag, "poll"), (engine_mod.Engine, "_after_step"),
]


def wrap(owner: Any, name: str, record: Callable[[str, float], None]) -> Callable[[], None]:
    original = getattr(owner, name)
    label = f"{getattr(owner, '__name__', owner)}.{name}".replace("igniter_dist.", "")

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record(label, time.perf_counter() - t0)

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    calls: dict[str, list[float]] = {}

    def record(label: str, seconds: float) -> None:
        calls.setdefault(label, []).append(seconds)

    undo = [wrap(owner, name, record) for owner, name in PER_ITERATION]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp, timed_loader_next(clock), timed_collectives(clock):
        ctx = RunContext(WORKLOADS[args.workload], args.warmup + args.steps, rank, world_size, clock, Path(tmp))
        igniter.run(ctx)
    for u in undo:
        u()
    if rank == 0:
        s = clock.summary(skip=args.warmup)
        print(f"\nworld size {world_size}: framework {s['framework_us']:.1f} us/iteration "
              f"(collectives {s['collective_us']:.1f}); the wrapped calls, median us per call:", file=sys.stderr)
        for label, times in sorted(calls.items(), key=lambda kv: -statistics.median(kv[1])):
            print(f"  {label:32s} {1e6 * statistics.median(times[args.warmup:] or times):8.1f}  "
                  f"({len(times)} calls)", file=sys.stderr)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
