"""The engine's own work per training step, counted in aten operations, so it cannot creep up.

A step function that issues no operation of its own returns a loss that requires grad; a
dispatch mode entered inside one step and left inside a later one counts every operation the
engine issued between them. On this CPU run the loss is read on the host (no device to sync
with); a value on a device is copied into a device slot instead, counted on the meta device below:
those are the kernels a GPU run launches per step (scripts/gpu_sync_check.py checks that none of
them synchronises with the host).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

import igniter_dist as ig
from igniter_dist import engine
from igniter_dist.metrics import MetricSet
from igniter_dist.signals import StopFlag
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


READ = "aten._local_scalar_dense.default"  # Tensor.item(): the CPU loss read into the buffer's numpy view


def test_a_training_step_costs_the_engine_one_operation(tmp_path):
    (steady,) = count_ops(tmp_path, [(5, 15)])
    # Per step: read the CPU loss and store it in a preallocated slot. Nothing is allocated or launched.
    assert steady == {READ: 10}


def test_a_device_loss_costs_a_detach_and_a_copy_into_its_slot():
    ms = MetricSet({"loss": "loss"}, torch.device("meta"), distributed=False)
    loss = torch.zeros((), device="meta", requires_grad=True)
    ms.update({"loss": loss}, 4)  # the first update checks the outputs
    with OpCounter() as counter:
        for _ in range(10):
            ms.update({"loss": loss}, 4)
    # The graph-free view of the loss, copied into the next device slot: no host read, no allocation.
    assert counter.ops == {"aten.detach.default": 10, "aten.copy_.default": 10}


def test_a_full_metric_buffer_and_a_log_step_cost_a_fixed_handful(tmp_path):
    fold, log = count_ops(tmp_path, [(60, 70), (95, 99)], log_every=97)
    # The 64th buffered value folds the buffer into the float64 sum: sum, add_.
    assert fold == {READ: 10, "aten.sum.default": 1, "aten.add_.Tensor": 1}
    # Logging at step 97: fold the 33 values buffered since (slice, sum, add_), stack the sums and the
    # counts (lift_fresh: the counts to a tensor), read them back once (tolist: no aten op), zero the sum.
    assert log == {READ: 4, "aten.slice.Tensor": 1, "aten.sum.default": 1, "aten.add_.Tensor": 1,
                   "aten.stack.default": 2, "aten.lift_fresh.default": 1, "aten.zero_.default": 1}


def test_without_a_live_bar_the_loop_builds_a_position_only_where_a_line_prints(tmp_path, monkeypatch):
    built: list[int] = []

    def recorded(**fields: Any) -> Progress:
        built.append(fields["step"])
        return Progress(**fields)

    monkeypatch.setattr(engine, "Progress", recorded)
    count_ops(tmp_path, [], log_every=30)  # the console writes lines here (pytest's capture is no terminal)
    # The first step (the console's rate counts from it), the log steps, the epoch's end: not the other 95.
    assert built == [1, 30, 60, 90, 100]


def test_between_due_steps_the_loop_skips_the_after_step_checks(tmp_path, monkeypatch):
    called: list[int] = []
    after_step = engine.Engine._after_step

    def recorded(self: engine.Engine, save_due: bool) -> None:
        called.append(self.state.step)
        after_step(self, save_due)

    monkeypatch.setattr(engine.Engine, "_after_step", recorded)
    count_ops(tmp_path, [], log_every=30, eval_every="40steps")
    # Only where a log or a step-scheduled evaluation is due; the other 94 steps have nothing to do there.
    assert called == [30, 40, 60, 80, 90]


def test_one_process_with_one_mean_calls_the_mean_directly_and_polls_no_flag(tmp_path, monkeypatch):
    calls: list[str] = []
    set_update, poll = MetricSet.update, StopFlag.poll

    def recorded_update(self: MetricSet, *args: Any, **kwargs: Any) -> None:
        calls.append("MetricSet.update")
        set_update(self, *args, **kwargs)

    def recorded_poll(self: StopFlag, *args: Any) -> tuple[int, bool]:
        calls.append("StopFlag.poll")
        return poll(self, *args)

    monkeypatch.setattr(MetricSet, "update", recorded_update)
    monkeypatch.setattr(StopFlag, "poll", recorded_poll)
    count_ops(tmp_path, [], log_every=30)
    # The first step's update checks the outputs; from then on the mean's own update runs, one frame fewer.
    # One process has no agreement to launch: the flag is read in the loop (test_resume's single-process
    # SIGINT/SIGTERM runs check it is still honoured).
    assert calls == ["MetricSet.update"]
