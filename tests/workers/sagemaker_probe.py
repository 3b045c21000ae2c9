"""A worker started by `igniter-dist sagemaker-entrypoint` in the simulated two-host job.

Records what it sees (ranks, hosts, arguments, SM_* variables) in <out>/rank<R>.json after a gloo
all-reduce; with `--sleep true` it then waits, and its SIGTERM handler writes <out>/term<R> and
exits 143, which proves the signal travelled entrypoint -> torchrun -> worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from igniter_dist.runtime import exit_process


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sleep", default="false")
    p.add_argument("--epochs", default=None)
    p.add_argument("--flag", default=None)
    p.add_argument("--given", default=None)
    args, unknown = p.parse_known_args()
    out = Path(args.out)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    record = {
        "rank": rank,
        "world_size": world,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "sum": int(total.item()),
        "argv": sys.argv[1:],
        "epochs": args.epochs,
        "flag": args.flag,
        "given": args.given,
        "unknown": unknown,
        "env": {k: v for k, v in os.environ.items() if k.startswith("SM_") or k == "NCCL_SOCKET_IFNAME"},
        "cwd": os.getcwd(),
        "pid": os.getpid(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"probe: rank {rank} of {world} on node {record['group_rank']}", flush=True)
    if args.sleep.lower() != "true":
        dist.destroy_process_group()
        return 0

    def on_term(signum, frame):
        (out / f"term{rank}").write_text(str(signum))
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    (out / f"ready{rank}").write_text("ready")
    time.sleep(300)
    return 1  # the test failed to stop us


if __name__ == "__main__":
    exit_process(main(), distributed=True)
