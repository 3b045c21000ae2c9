"""The digits example under torchrun, with the time each start-up phase ends noted, up to "resumed from".

relaunch.py runs it in place of examples/digits/train.py, with the same arguments. As soon as its
checkpoint is loaded, each rank writes `rank<N>.json` into the folder named by RELAUNCH_MARKS (one
file per rank: lines two ranks print at once can interleave on a shared pipe), holding the
wall-clock time (time.time()) at which each phase ended; the driver subtracts its own launch time.
"""

import time

STARTED = time.time()  # the worker's first line: the interpreter is up, nothing imported yet

import json  # imports are timed: each one after the clock starts
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

marks: dict[str, float] = {"worker started": STARTED}


def mark(name: str) -> None:
    marks.setdefault(name, time.time())


import torch

mark("torch imported")
import torch.distributed

import igniter_dist
from igniter_dist import main as main_mod
from igniter_dist import training
from igniter_dist.checkpoint.manager import CheckpointManager

mark("igniter_dist imported")
import torchmetrics  # noqa: F401  # what the example imports next

mark("torchmetrics imported")


def after(owner: Any, name: str, label: str, before: str | None = None) -> None:
    """Note when each call of `owner.name` returns (and, with `before`, when the first one starts)."""
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        try:
            return original(*args, **kwargs)
        finally:
            mark(label)

    setattr(owner, name, timed)


after(main_mod, "init_runtime", "process group started", before="flags parsed")
after(torch.utils.data.DataLoader, "__init__", "datasets built (first DataLoader)")
after(igniter_dist, "prepare", "model prepared (DDP)")
after(training, "_assemble", "engine assembled (loaders, sinks, folder probe)", before="ig.train called")
after(CheckpointManager, "latest", "latest committed step found")
after(CheckpointManager, "_load", "checkpoint loaded (DCP)", before="load starts")


def report_resume(original: Callable[..., Any]) -> Callable[..., Any]:
    def resume(engine: Any, *args: Any) -> Any:
        result = original(engine, *args)
        mark("resumed from")
        out = Path(os.environ["RELAUNCH_MARKS"]) / f"rank{engine.runtime.rank}.json"
        out.write_text(json.dumps({"rank": engine.runtime.rank, "marks": marks}))
        return result

    return resume


training._start = report_resume(training._start)  # timing wraps it for the run

if __name__ == "__main__":
    example = Path(__file__).resolve().parents[2] / "examples" / "digits" / "train.py"
    sys.path.insert(0, str(example.parent))
    sys.argv = [str(example), *sys.argv[1:]]
    runpy.run_path(str(example), run_name="__main__")
