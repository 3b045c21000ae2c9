"""A small DDP job that saves and loads checkpoints with CheckpointManager, for the checkpoint tests.

Run under torchrun (or plain python for one process). Faults are injected from here, never from
the package: `--kill POINT` SIGKILLs one rank at a point of the save of `--fault-step`; `--pause`
makes rank 1 stop inside its DCP write of `--fault-step` until the test lets it go on (the test
stops the S3 server meanwhile). Rank 0 dumps what it saved under `--expect` for the test to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch
from torch import nn

from igniter_dist.checkpoint import CheckpointManager, export_model
from igniter_dist.checkpoint.manager import CheckpointManager as _Manager
from igniter_dist.checkpoint.storage import Storage, fsspec_io
from igniter_dist.errors import CheckpointError
from igniter_dist.runtime import exit_process, init_runtime, shutdown_runtime
from igniter_dist.wrapping import prepare, unwrap


def build(seed: int):
    torch.manual_seed(seed)
    model = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    counters = {"seen": torch.zeros(3, dtype=torch.int64), "epoch": 0}
    return model, optimizer, scheduler, counters


def train_one(model, optimizer, scheduler, counters, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    counters["seen"] += 1
    counters["epoch"] = step


def per_rank_state(rank: int, step: int) -> dict:
    return {"rng": torch.get_rng_state(), "mine": torch.full((2,), float(rank * 100 + step)),
            "cursor": (rank, step)}


def kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str, rank: int, sync: Path | None) -> None:
    """Patch one step of the next save so that this rank dies (or pauses) there, for the rest of the process."""
    FsspecWriter, _ = fsspec_io()
    if point == "write" and rank == 1:
        original = FsspecWriter.write_data

        def write_then_die(self, plan, planner):
            fut = original(self, plan, planner)
            fut.wait()
            kill_self()
            return fut

        patch.object(FsspecWriter, "write_data", write_then_die).start()
    elif point == "commit" and rank == 0:
        patch.object(_Manager, "_commit", lambda *a, **k: kill_self()).start()
    elif point == "retention" and rank == 0:
        retain, rm_tree = _Manager._retain, Storage.rm_tree
        in_retention = []

        def retain_flagged(self):
            in_retention.append(True)
            return retain(self)

        def rm_tree_or_die(self, *parts):
            if in_retention:
                kill_self()  # retention already removed this folder's manifest
            return rm_tree(self, *parts)

        patch.object(_Manager, "_retain", retain_flagged).start()
        patch.object(Storage, "rm_tree", rm_tree_or_die).start()
    elif point == "pause" and rank == 1:
        assert sync is not None
        original = FsspecWriter.write_data

        def pause_then_write(self, plan, planner):
            (sync / "paused").touch()
            while not (sync / "resume").exists():
                time.sleep(0.05)
            return original(self, plan, planner)

        patch.object(FsspecWriter, "write_data", pause_then_write).start()


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"the test never created {path}")
        time.sleep(0.05)


def save_mode(args, rt) -> int:
    model, optimizer, scheduler, counters = build(seed=args.seed)
    mgr = CheckpointManager(args.url, rt, n_saved=args.n_saved, keep_best=args.keep_best,
                            async_save=args.async_save, on_error=args.on_error)
    expect = Path(args.expect) if args.expect else None
    sync = Path(args.sync) if args.sync else None
    start = mgr.latest() or 0
    if start:
        mgr.load(start, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "counters": counters})
    results = {}
    for step in [int(s) for s in args.steps.split(",")]:
        if step <= start:
            continue
        train_one(model, optimizer, scheduler, counters, rt.rank, step)
        if step == args.fault_step and args.fault:
            inject(args.fault, rt.rank, sync)
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "counters": counters}
        metrics = {"eval/accuracy": float(args.metrics.get(str(step), step / 100))}
        if expect is not None:
            torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "counters": dict(counters)},
                       expect / f"step{step}.pt")
            torch.save(per_rank_state(rt.rank, step), expect / f"step{step}_rank{rt.rank}.pt")
        try:
            ok = mgr.save(step, state, per_rank=per_rank_state(rt.rank, step),
                          manifest={"epoch": step, "args": {"lr": 0.01}}, metrics=metrics)
            if args.async_save:
                mgr.wait()
        except CheckpointError as e:
            print(f"rank {rt.rank}: CheckpointError: {e}", flush=True)
            mgr.close()
            return 3
        results[step] = ok
        if step == args.fault_step and args.fault == "pause" and sync is not None:
            # Let the test bring the server back before the next save.
            (sync / f"after{step}_rank{rt.rank}").touch()
            wait_for(sync / "restarted")
    mgr.close()
    if rt.is_main and args.export:
        export_model(model, args.export)  # the DDP wrapper itself: the file must not say "module."
    if rt.is_main and expect is not None:
        (expect / "results.json").write_text(json.dumps(results))
    if args.verify_load:
        assert expect is not None
        latest = CheckpointManager(args.url, rt).latest()
        assert latest is not None
        check_load(args, rt, latest, expect)
    return 0


def check_load(args, rt, step: int, expect: Path) -> None:
    """Load `step` into freshly built objects (other weights) and compare with what was saved."""
    model, optimizer, scheduler, counters = build(seed=args.seed + 12345)
    mgr = CheckpointManager(args.url, rt)
    result = mgr.load(step, {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                             "counters": counters})
    want = torch.load(expect / f"step{step}.pt", weights_only=True)
    for k, v in want["model"].items():
        assert torch.equal(unwrap(model).state_dict()[k], v), f"model {k} differs"
    got_opt = optimizer.state_dict()
    for i, st in want["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(got_opt["state"][i][k], v), f"optimizer state {i}.{k} differs"
    assert got_opt["param_groups"] == want["optimizer"]["param_groups"], "param groups differ"
    assert scheduler.state_dict() == want["scheduler"], (scheduler.state_dict(), want["scheduler"])
    assert torch.equal(counters["seen"], want["counters"]["seen"]) and counters["epoch"] == want["counters"]["epoch"]
    assert result.saved_world_size == args.saved_world_size, result.saved_world_size
    assert result.manifest["step"] == step and result.manifest["epoch"] == step
    if rt.rank < result.saved_world_size:
        mine = torch.load(expect / f"step{step}_rank{rt.rank}.pt", weights_only=True)
        assert result.per_rank is not None
        assert torch.equal(result.per_rank["rng"], mine["rng"]) and torch.equal(result.per_rank["mine"], mine["mine"])
        assert tuple(result.per_rank["cursor"]) == tuple(mine["cursor"])
    else:
        assert result.per_rank is None, result.per_rank
    # Every rank read the same tensors.
    gathered = rt.all_gather_object([t.sum().item() for t in unwrap(model).state_dict().values()])
    assert all(g == gathered[0] for g in gathered)
    (expect / f"loaded_step{step}_w{rt.world_size}_rank{rt.rank}").touch()
    mgr.close()


def load_mode(args, rt) -> int:
    latest = CheckpointManager(args.url, rt).latest()
    assert latest == int(args.steps), f"latest is {latest}, expected {args.steps}"
    check_load(args, rt, latest, Path(args.expect))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--url", required=True)
    p.add_argument("--steps", default="1,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-saved", type=int, default=2)
    p.add_argument("--keep-best", default=None)
    p.add_argument("--metrics", type=json.loads, default={})
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--on-error", default="stop")
    p.add_argument("--expect", default=None)
    p.add_argument("--sync", default=None)
    p.add_argument("--fault", default=None, choices=["write", "commit", "retention", "pause"])
    p.add_argument("--fault-step", type=int, default=-1)
    p.add_argument("--saved-world-size", type=int, default=2)
    p.add_argument("--export", default=None, help="Rank 0 exports the final model here.")
    p.add_argument("--verify-load", action="store_true",
                   help="After saving, load the latest into new objects and compare.")
    args = p.parse_args()
    rt = init_runtime("cpu")
    try:
        return save_mode(args, rt) if args.mode == "save" else load_mode(args, rt)
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    code = main()  # an exception propagates with its traceback and the usual teardown
    exit_process(code, distributed=True)
