"""One torchrun job: every implementation trains the same workload in interleaved rounds, in this process.

Runs share the job (and its process group), so launch and import costs stay out of the figures
and machine drift hits all implementations alike. Rank 0 writes one record per run.

    torchrun --nproc-per-node 2 benchmarks/overhead/worker.py --workload mlp --out runs/bench/x.json
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from harness import OUT, StepClock, schedule, timed_collectives, timed_loader_next, write_json
from impls import IMPLS, available, runner
from workloads import WORKLOADS, RunContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    p.add_argument("--impls", default=",".join(n for n in IMPLS if n != "raw"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=50, help="Steps of each run left out of the figures.")
    p.add_argument("--steps", type=int, default=300, help="Timed steps of each run.")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    wanted = [n for n in args.impls.split(",") if n]
    impls = [n for n in wanted if available(n)]
    skipped = [n for n in wanted if n not in impls]
    threads = torch.get_num_threads()
    scratch = OUT / "scratch" / f"overhead-{args.workload}-{world_size}"
    runs = []
    for position, (rnd, name) in enumerate(schedule(impls, args.rounds)):
        workdir = scratch / f"{position:03d}-{name}"
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
        torch.set_num_threads(threads)  # a peer may change it; every run starts alike
        torch.manual_seed(1)
        gc.collect()
        if world_size > 1:
            dist.barrier()
        clock = StepClock()
        ctx = RunContext(WORKLOADS[args.workload], args.warmup + args.steps, rank, world_size, clock, workdir)
        started = time.perf_counter()
        with timed_loader_next(clock), timed_collectives(clock):
            runner(name)(ctx)
        record: dict[str, Any] = {"round": rnd, "position": position, "impl": name,
                                  "wall_s": time.perf_counter() - started, **clock.summary(skip=args.warmup)}
        runs.append(record)
        if rank == 0:
            print(f"bench: round {rnd} {name:13s} median {record['median_s'] * 1e3:7.3f} ms  "
                  f"framework {record['framework_us']:7.1f} us (collectives {record['collective_us']:.1f})  "
                  f"run {record['wall_s']:.1f} s", file=sys.stderr, flush=True)
    if rank == 0:
        write_json(args.out, {"workload": args.workload, "world_size": world_size, "warmup": args.warmup,
                              "steps": args.steps, "rounds": args.rounds, "skipped": skipped, "runs": runs})
        shutil.rmtree(scratch, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
