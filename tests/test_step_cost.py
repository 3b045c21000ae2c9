"""The engine's own work per training step, counted in aten operations, so it cannot creep up.

A step function that issues no operation of its own returns a loss that requires grad; a
dispatch mode entered inside one step and left inside a later one counts every operation the
engine issued between them. Besides moving the batch, the engine issues the same operations on a
GPU, so these counts are the kernels it would launch per step (scripts/gpu_sync_check.py checks
that none of them synchronises with the host).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

import igniter_dist as ig
from igniter_dist import engine
from igniter_dist.tracking.base import Progress

BATCH = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace != "profiler":  # the DataLoader's record_function markers, not the engine's
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Indices(Dataset[int]):
    """Map-style indices whose collate hands back one prebuilt batch: reading issues no operation."""

    def __len__(self) -> int:
        return 4 * 100

    def __getitem__(self, i: int) -> int:
        return i


def count_ops(tmp_path, windows: list[tuple[int, int]], **train: Any) -> list[Counter[str]]:
    """Train 100 steps in this process; the operations issued between the starts of steps a and b, per window."""
    weight = torch.tensor(2.0, requires_grad=True)
    counters = [OpCounter() for _ in windows]

    def step(engine, batch):
        done = engine.state.step
        for (a, b), counter in zip(windows, counters, strict=True):
            if done == a:
                counter.__enter__()
            elif done == b:
                counter.__exit__(None, None, None)
        return {"loss": weight}  # requires grad, like a real loss; the step itself issues nothing

    loader = DataLoader(Indices(), batch_size=4, collate_fn=lambda items: BATCH)
    ig.train(to_save={"weight": weight}, train_spec=ig.RunSpec(step=step, loader=loader, metrics={"loss": "loss"}),
             **{"max_epochs": 1, "checkpoint_dir": "none", "output_dir": str(tmp_path), "console": True,
                "eval_every": 0, "save_every": 0, **train})
    return [c.ops for c in counters]


def test_a_training_step_costs_the_engine_two_operations(tmp_path):
    (steady,) = count_ops(tmp_path, [(5, 15)])
    # Per step: detach the loss, copy it into a preallocated slot. Nothing is allocated, nothing read back.
    assert steady == {"aten.detach.default": 10, "aten.copy_.default": 10}


def test_a_full_metric_buffer_and_a_log_step_cost_a_fixed_handful(tmp_path):
    fold, log = count_ops(tmp_path, [(60, 70), (95, 99)], log_every=97)
    # The 64th buffered value folds the buffer into the float64 sum: sum, add_.
    assert fold == {"aten.detach.default": 10, "aten.copy_.default": 10, "aten.sum.default": 1,
                    "aten.add_.Tensor": 1}
    # Logging at step 97: fold the 33 values buffered since (slice, sum, add_), stack the sums and the
    # counts (lift_fresh: the counts to a tensor), read them back once (tolist: no aten op), zero the sum.
    assert log == {"aten.detach.default": 4, "aten.copy_.default": 4, "aten.slice.Tensor": 1, "aten.sum.default": 1,
                   "aten.add_.Tensor": 1, "aten.stack.default": 2, "aten.lift_fresh.default": 1,
                   "aten.zero_.default": 1}


def test_without_a_live_bar_the_loop_builds_a_position_only_where_a_line_prints(tmp_path, monkeypatch):
    built: list[int] = []

    def recorded(**fields: Any) -> Progress:
        built.append(fields["step"])
        return Progress(**fields)

    monkeypatch.setattr(engine, "Progress", recorded)
    count_ops(tmp_path, [], log_every=30)  # the console writes lines here (pytest's capture is no terminal)
    # The first step (the console's rate counts from it), the log steps, the epoch's end: not the other 95.
    assert built == [1, 30, 60, 90, 100]
