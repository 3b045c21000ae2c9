"""Stop on SIGINT / SIGTERM / SIGHUP without losing work: the handler only sets a flag.

Ranks agree on the flag at a step boundary through a non-blocking all-reduce read at the next
check, so the agreement overlaps training instead of stalling it. Launching a gloo all-reduce
costs ~80 us here (7% of a small MLP's step), so fast steps check every `check_every` steps; slow
steps check more often so a signal is honoured within about CHECK_SECONDS, far inside torchrun's
30 s and SageMaker's 120 s. Rank 0 proposes the next interval from its step time inside the same
all-reduce, so every rank switches at the same step; until its first proposal arrives every step
checks, so a slow model is not exposed for `check_every` steps at the start. All ranks then stop
after the same step (an accumulation window's last), save it, and exit with 128 + signal number.

Launchers signal whole process groups (torchrun, a terminal's Ctrl-C) or every process of a job
(Slurm, container stops), so DataLoader worker processes get the signal too: they start with the
stop signals ignored (`stop_safe_worker_init`), and their rank shuts them down after its save.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CHECK_EVERY = 10  # most steps between agreements; a signal is honoured within two intervals
CHECK_SECONDS = 0.25  # aim: an agreement at least this often when steps are slow
ABORT_AFTER_SECONDS = 1.0  # a second SIGINT this long after the first aborts; sooner, it is the same stop


class Interrupted(Exception):
    """Training stopped on a signal after saving; `igniter_main` exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """The local stop request and the cross-rank agreement on it."""

    def __init__(self, distributed: bool, group: Any = None, check_every: int = CHECK_EVERY,
                 is_main: bool = True):
        self.distributed = distributed
        self.is_main = is_main  # rank 0 proposes the interval
        self.group = group  # a gloo group when the default one is nccl: the flag stays on the host
        self.check_every = check_every
        self.requested = 0  # signal number, 0 when none
        self._requested_at = 0.0
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._calls = 0
        self._next_check = 1  # check every step until rank 0's first proposal arrives
        self._last_check = (0, time.monotonic())
        self._flag = torch.zeros(3, dtype=torch.int32)
        self._flag_values = self._flag.numpy()  # the same memory: set without three indexing ops

    def install(self) -> None:
        """Take over the stop signals (main thread only); `restore` gives back the user's handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in HANDLED:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            # A person's second Ctrl-C aborts. The same stop often arrives twice (scancel or a container stop
            # signals every process, and torchrun forwards its own copy), and launchers follow SIGTERM with
            # SIGKILL, not a second SIGTERM: those are not asked to abort.
            if signum != signal.SIGINT or time.monotonic() - self._requested_at < ABORT_AFTER_SECONDS:
                return
            sys.stderr.write(f"igniter-dist: second {signal.Signals(signum).name}, aborting without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested, self._requested_at = signum, time.monotonic()
        sys.stderr.write(
            f"igniter-dist: {signal.Signals(signum).name} received; saving at the next step boundary "
            "(send it again to abort at once)\n"
        )
        sys.stderr.flush()

    def poll(self, save_due: bool = False) -> tuple[int, bool]:
        """Collective: (signal to stop on, whether to save now), agreed by all ranks, one step late.

        Launches this step's all-reduce and returns the result of the previous step's, which has
        had a whole step to complete. `save_due` is rank 0's clock-based save request.
        """
        if not self.distributed:
            return self.requested, save_due
        self._calls += 1
        if self._calls < self._next_check:
            return 0, False  # every rank counts the same calls and intervals, so all check together
        agreed, interval = (0, False), 1
        if self._pending is not None:
            signum, save, proposed = self._finish()
            agreed, interval = (signum, save), proposed or self.check_every
        self._flag_values[:] = self.requested, int(save_due), self._propose()
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, self._flag)
        self._next_check = self._calls + interval
        return agreed[0], agreed[1]

    def _propose(self) -> int:
        """Rank 0: steps per CHECK_SECONDS at its current pace, within 1..check_every; others 0."""
        calls, then = self._last_check
        now = time.monotonic()
        self._last_check = (self._calls, now)
        if not self.is_main or self._calls == calls:
            return 0
        step_s = (now - then) / (self._calls - calls)
        return max(1, min(self.check_every, int(CHECK_SECONDS / max(step_s, 1e-9))))

    def drain(self) -> int:
        """Collective: finish the last launched agreement (every rank launched the same number)."""
        if not self.distributed or self._pending is None:
            return self.requested
        return self._finish()[0]

    def _finish(self) -> tuple[int, bool, int]:
        assert self._pending is not None
        work, value = self._pending
        self._pending = None
        work.wait()
        signum, save_due, interval = value.tolist()  # a finished host-side op: no device sync
        return int(signum), bool(save_due), int(interval)


# ---------------------------------------------------------------- loader worker processes


class stop_safe_worker_init:  # noqa: N801  (a function to its users; a class so that spawn can pickle it)
    """A DataLoader `worker_init_fn` that ignores SIGINT, SIGTERM and SIGHUP, then calls `worker_init_fn`.

    Launchers deliver a stop to the rank's whole process group or to every process of the job; a worker
    that died of it would crash its rank before the save. igniter-dist sets this on every DataLoader it
    trains or evaluates with; pass it yourself to loaders that reach the engine some other way:
    `DataLoader(..., worker_init_fn=ig.stop_safe_worker_init(my_init))`.
    """

    def __init__(self, worker_init_fn: Callable[[int], Any] | None = None):
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def ignore_stop_signals() -> None:
    """In a helper process of a rank: leave stopping to the rank (which saves, then shuts it down)."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # held back while the rank started this process: now discarded
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def protect_workers(loader: Any) -> None:
    """Make a DataLoader's future worker processes ignore the stop signals (in place; idempotent)."""
    init = getattr(loader, "worker_init_fn", None)
    if getattr(loader, "num_workers", 0) and not isinstance(init, stop_safe_worker_init):
        loader.worker_init_fn = stop_safe_worker_init(init)  # DataLoader allows this attribute after creation


def start_iterator(loader: Any) -> Iterator[Any]:
    """`iter(loader)`, with the stop signals held back in this thread while it starts worker processes.

    A forked worker inherits the held mask, so a signal sent to the group between its start and its
    `worker_init_fn` cannot kill it; this rank takes any signal that came meanwhile once they started.
    """
    if not getattr(loader, "num_workers", 0) or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_workers(iterator: Any) -> None:
    """Shut down a DataLoader iterator's worker processes now, as its finalizer would.

    They ignore the stop signals, so after a stop's save the rank ends them itself, before it exits;
    `_shutdown_workers` is the step torch's own `__del__` takes (there is no public close).
    """
    with contextlib.suppress(Exception):
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
