"""Where igniter-dist's per-iteration time goes, to the microsecond: a timeline of its loop's calls.

The framework's time in an iteration is the interval from the end of one user step to the start of
the next, minus the DataLoader's `next` (what the overhead benchmark's StepClock reports). This
script wraps, from outside, every call `Engine.run` makes in that interval and records when each
starts and ends. Each iteration's interval is then cut into the top-level calls and the gaps
between them: a gap is the loop's own code between two named events (an attribute read, a counter
update, a generator resuming), so every microsecond lands either in a named call or in a gap named
by the events around it. Means over the iterations add up exactly to the mean framework time;
medians are shown beside them. Iterations that log (every 50th) are left out, as the benchmark's
median leaves them out.

The wrappers cost time of their own; a run without them (every other run, `--rounds`) gives the
framework time the benchmark would see, and the difference is the instrument's share.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 1 benchmarks/overhead/attribute.py --workload tiny
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/overhead/attribute.py --workload mlp --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
from harness import StepClock, timed_collectives, timed_loader_next
from impls import igniter
from torch.utils.data import dataloader
from workloads import LOG_EVERY, WORKLOADS, RunContext

import igniter_dist.engine as engine_mod
from igniter_dist import metrics, signals, steps
from igniter_dist.tracking import base

# (owner, attribute) of the calls the loop makes between two user steps, as far as they exist in
# this version of the engine (a renamed or removed one is skipped, so the script outlives refactors).
CANDIDATES: list[tuple[Any, str]] = [
    (engine_mod.Engine, "_train_step"), (engine_mod.Engine, "_call"), (steps.GradientStepper, "micro_step"),
    (engine_mod, "to_device"), (engine_mod, "batch_size"), (metrics.MetricSet, "update"),
    (engine_mod.Engine, "_progress"), (base.Sinks, "progress"), (base.NullSink, "progress"),
    (engine_mod.Engine, "_time_to_save"), (signals.StopFlag, "poll"), (engine_mod.Engine, "_after_step"),
    (engine_mod.Engine, "_step_schedulers"),
]

STEP = "user step"
DATA = "DataLoader next"

Event = tuple[float, int, str]  # (time, +1 start / -1 end, label)


class Timeline:
    """Start and end times of every wrapped call, the user's steps and the loader's `next`."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def start(self, label: str) -> None:
        self.events.append((time.perf_counter(), 1, label))

    def end(self, label: str) -> None:
        self.events.append((time.perf_counter(), -1, label))


def label_of(owner: Any, name: str) -> str:
    return f"{getattr(owner, '__name__', owner)}.{name}".replace("igniter_dist.", "")


def wrap(owner: Any, name: str, timeline: Timeline) -> Callable[[], None]:
    """Record the start and end of every call of `owner.name`; returns the undo."""
    original = getattr(owner, name)
    label = label_of(owner, name)
    if name == "micro_step":  # a context manager: time entering and leaving it, apart
        @contextlib.contextmanager
        def timed_cm(*args: Any, **kwargs: Any) -> Iterator[Any]:
            timeline.start(label + " (enter)")
            cm = original(*args, **kwargs)
            value = cm.__enter__()
            timeline.end(label + " (enter)")
            try:
                yield value
            finally:
                timeline.start(label + " (exit)")
                cm.__exit__(*sys.exc_info())
                timeline.end(label + " (exit)")

        setattr(owner, name, timed_cm)
    else:
        def timed(*args: Any, **kwargs: Any) -> Any:
            timeline.start(label)
            try:
                return original(*args, **kwargs)
            finally:
                timeline.end(label)

        setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def wrap_batches(timeline: Timeline) -> Callable[[], None]:
    """Time every `next` the loop takes from its batch generator (the loader's `next` nests inside)."""
    owner = engine_mod.Engine
    name = next((n for n in ("_train_batches", "_batches") if hasattr(owner, n)), None)
    if name is None:
        return lambda: None
    original = getattr(owner, name)
    label = f"next(Engine.{name}())"

    class Timed:
        def __init__(self, it: Iterator[Any]):
            self.it = it

        def __iter__(self) -> Timed:
            return self

        def __next__(self) -> Any:
            timeline.start(label)
            try:
                return next(self.it)
            finally:
                timeline.end(label)

    def batches(self: Any, *args: Any, **kwargs: Any) -> Timed:
        return Timed(iter(original(self, *args, **kwargs)))

    setattr(owner, name, batches)
    return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def instrumented(timeline: Timeline) -> Iterator[None]:
    undo = [wrap(owner, name, timeline) for owner, name in CANDIDATES if hasattr(owner, name)]
    undo.append(wrap_batches(timeline))
    loader_next = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self: Any) -> Any:
        timeline.start(DATA)
        try:
            return loader_next(self)
        finally:
            timeline.end(DATA)

    dataloader._BaseDataLoaderIter.__next__ = timed_next  # type: ignore[method-assign]  # timing wraps it for the run
    try:
        yield
    finally:
        dataloader._BaseDataLoaderIter.__next__ = loader_next  # type: ignore[method-assign]
        for u in reversed(undo):
            u()


class TimelineClock(StepClock):
    """The benchmark's clock, also marking the user's step on the timeline."""

    def __init__(self, timeline: Timeline):
        super().__init__()
        self.timeline = timeline

    def begin(self) -> None:
        self.timeline.start(STEP)
        super().begin()

    def end(self) -> None:
        super().end()
        self.timeline.end(STEP)


def intervals(events: list[Event]) -> list[tuple[float, float, str]]:
    """Pair every start with its end: (start, end, label), in order of start."""
    open_: list[tuple[float, str]] = []
    out = []
    for t, kind, label in events:
        if kind == 1:
            open_.append((t, label))
        else:
            i = max(i for i, (_, name) in enumerate(open_) if name == label)
            start, _ = open_.pop(i)
            out.append((start, t, label))
    return sorted(out)


def partition(events: list[Event], skip: int) -> list[dict[str, float]]:
    """Per iteration: seconds in each top-level call and each gap between two user steps.

    A window runs from a step's end to the next step's start. Calls wholly inside it and inside no
    other such call are its top-level calls; the calls that enclose the step (`Engine._call`,
    `Engine._train_step`) end or start inside it and only mark the gaps. The loader's `next` is the
    data's time, not the framework's: it is taken out of the call it nests in (the batch
    generator's `next`), as the benchmark's clock takes it out of the iteration.
    """
    spans = intervals(events)
    user_steps = [(a, b) for a, b, label in spans if label == STEP]
    out: list[dict[str, float]] = []
    for i in range(len(user_steps) - 1):
        steps_done = i + 1
        if steps_done <= skip or steps_done % LOG_EVERY == 0:
            continue
        lo, hi = user_steps[i][1], user_steps[i + 1][0]
        inside = [s for s in spans if lo <= s[0] and s[1] <= hi and s[2] != STEP]
        top: list[tuple[float, float, str]] = []
        for s in inside:
            if not top or s[0] >= top[-1][1]:
                top.append(s)
        marks = sorted([(a, f"{label} starts") for a, b, label in spans if lo < a < hi and b > hi]
                       + [(b, f"{label} ends") for a, b, label in spans if lo < b < hi and a < lo])
        timeline = sorted([(a, b, label, True) for a, b, label in top] + [(t, t, name, False) for t, name in marks])
        w: dict[str, float] = {}
        last_t, last_name = lo, "step ends"
        for a, b, label, is_call in timeline:
            gap = f"gap: {last_name} -> {label + ' starts' if is_call else label}"
            w[gap] = w.get(gap, 0.0) + a - last_t
            if is_call:
                data = sum(d1 - d0 for d0, d1, name in inside if name == DATA and a <= d0 and d1 <= b)
                if label != DATA:
                    w[label] = w.get(label, 0.0) + (b - a) - data
            last_t, last_name = b, (label + " ends" if is_call else label)
        gap = f"gap: {last_name} -> step begins"
        w[gap] = w.get(gap, 0.0) + hi - last_t
        out.append(w)
    return out


def run_once(workload: str, steps: int, rank: int, world_size: int, timeline: Timeline | None) -> StepClock:
    """Train `workload` once through the benchmark's igniter-dist configuration, on the timeline or not."""
    clock: StepClock = TimelineClock(timeline) if timeline is not None else StepClock()
    with tempfile.TemporaryDirectory() as tmp, timed_loader_next(clock), timed_collectives(clock):
        ctx = RunContext(WORKLOADS[workload], steps, rank, world_size, clock, Path(tmp))
        with instrumented(timeline) if timeline is not None else contextlib.nullcontext():
            igniter.run(ctx)
    return clock


def report(iterations: list[dict[str, float]], plain: list[float], timed: list[float], world_size: int) -> str:
    rows = {k: [w.get(k, 0.0) for w in iterations] for k in {k for w in iterations for k in w}}
    framework = [sum(w.values()) for w in iterations]
    lines = [f"world size {world_size}, {len(iterations)} iterations (logging ones left out); framework time:",
             f"  benchmark's clock, runs without the wrappers: median {1e6 * statistics.median(plain):.1f} us",
             f"  benchmark's clock, runs with the wrappers:    median {1e6 * statistics.median(timed):.1f} us",
             f"  on the timeline (with the wrappers):          mean {1e6 * statistics.fmean(framework):.1f} us, "
             f"median {1e6 * statistics.median(framework):.1f} us",
             "", f"  {'top-level call, or the loop between two events (gap)':86s} {'mean us':>8s} {'median':>8s}"]
    calls = [k for k in rows if not k.startswith("gap: ")]
    gaps = [k for k in rows if k.startswith("gap: ")]
    for group in (calls, gaps):
        for k in sorted(group, key=lambda k: -statistics.fmean(rows[k])):
            lines.append(f"  {k:86s} {1e6 * statistics.fmean(rows[k]):8.2f} {1e6 * statistics.median(rows[k]):8.2f}")
    lines.append(f"  {'sum of the means (= the mean on the timeline)':86s} "
                 f"{1e6 * sum(statistics.fmean(v) for v in rows.values()):8.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2, help="Pairs of runs: one without wrappers, one with.")
    args = p.parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    plain: list[float] = []
    timed: list[float] = []
    iterations: list[dict[str, float]] = []
    for _ in range(args.rounds):
        clock = run_once(args.workload, args.warmup + args.steps, rank, world_size, None)
        plain.append(clock.summary(skip=args.warmup)["framework_us"] / 1e6)
        timeline = Timeline()
        clock = run_once(args.workload, args.warmup + args.steps, rank, world_size, timeline)
        timed.append(clock.summary(skip=args.warmup)["framework_us"] / 1e6)
        iterations += partition(timeline.events, args.warmup)
    if rank == 0:
        print("\n" + report(iterations, plain, timed, world_size), file=sys.stderr)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
