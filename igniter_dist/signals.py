"""Stop on SIGINT / SIGTERM / SIGHUP without losing work: the handler only sets a flag.

Ranks agree on the flag at a step boundary through a non-blocking all-reduce launched every
`CHECK_EVERY` steps and read at the next check, so the agreement overlaps training instead of
stalling it (launching a gloo all-reduce costs ~80 us here: every step it was 7% of a small MLP's
step). All ranks then stop after the same step, save it, and exit with 128 + signal number.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CHECK_EVERY = 10  # steps between agreements; a signal is honoured within 2 x CHECK_EVERY steps


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

    def __init__(self, distributed: bool, group: Any = None, check_every: int = CHECK_EVERY):
        self.distributed = distributed
        self.group = group  # a gloo group when the default one is nccl: the flag stays on the host
        self.check_every = check_every
        self.requested = 0  # signal number, 0 when none
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._calls = 0
        self._flag = torch.zeros(2, dtype=torch.int32)

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
        if self.requested:  # a second signal: abort at once
            sys.stderr.write(f"igniter-dist: second {signal.Signals(signum).name}, aborting without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
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
        if self._calls % self.check_every:
            return 0, False  # every rank counts the same calls, so all skip and check together
        agreed = (0, False)
        if self._pending is not None:
            agreed = self._finish()
        self._flag[0], self._flag[1] = self.requested, int(save_due)
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, self._flag)
        return agreed

    def drain(self) -> int:
        """Collective: finish the last launched agreement (every rank launched the same number)."""
        if not self.distributed or self._pending is None:
            return self.requested
        return self._finish()[0]

    def _finish(self) -> tuple[int, bool]:
        assert self._pending is not None
        work, value = self._pending
        self._pending = None
        work.wait()
        signum, save_due = value.tolist()  # a finished host-side op: no device sync
        return int(signum), bool(save_due)
