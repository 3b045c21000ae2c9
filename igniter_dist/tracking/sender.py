"""A background sender: the caller appends to memory; one thread delivers, riding out outages.

Ordered operations are never dropped; buffered values (metrics) are bounded, the oldest going first
when full. A failure the destination calls transient marks it down (one warning, everything kept,
retries with backoff); any other failure drops that operation, or, while opening, turns the sender
off for good. Flush and close wait a bounded time. It knows nothing of what it sends or to whom.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, Literal, Protocol, TypeVar

Op = TypeVar("Op")
Item = TypeVar("Item")
State = Literal["new", "up", "down", "off"]  # new -> up <-> down; off once nothing can ever succeed


class Destination(Protocol[Op]):
    """Where a Sender delivers. Every method runs on the sender's thread."""

    @property
    def name(self) -> str:
        """What warnings call it, such as "MLflow at http://host:5000"."""
        ...

    def open(self) -> list[Op]:
        """Connect; returns the operations to send before anything already queued."""
        ...

    def send(self, op: Op) -> None: ...

    def transient(self, error: Exception) -> bool:
        """Whether `error` may pass by itself (server down or busy), rather than mean the request is wrong."""
        ...


class Sender(Generic[Op, Item]):
    """Delivers operations and buffered values to a destination from one daemon thread.

    Args:
        pack: turns up to `batch_size` buffered values into one operation.
        log: the owner's logger, which receives every warning (users silence or filter it by name).
    """

    def __init__(self, destination: Destination[Op], *, pack: Callable[[list[Item]], Op], log: logging.Logger,
                 thread_name: str, max_buffered: int = 100_000, batch_size: int = 1000,
                 max_backoff_s: float = 30.0):
        self._dest = destination
        self._pack = pack
        self._log = log
        self._thread_name = thread_name
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._ops: deque[Op] = deque()
        self._values: deque[Item] = deque(maxlen=max_buffered)
        self._inflight: list[Item] = []  # the batch being sent, kept until it is taken
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: State = "new"
        self._opened = False
        self._closing = False
        self._abandoned = False
        self._overflowed = 0

    @property
    def accepting(self) -> bool:
        """Whether what is put now may still be delivered (started, not closing, not off)."""
        return self._thread is not None and not self._closing and self._state != "off"

    @property
    def unsent(self) -> int:
        """Buffered values not delivered yet."""
        return len(self._values) + len(self._inflight)

    # The caller's side: append and wake the thread, nothing else.

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def put(self, op: Op) -> None:
        """Queue an operation, sent after those queued before it."""
        if self.accepting:
            self._ops.append(op)
            self._wake.set()

    def put_values(self, items: list[Item]) -> None:
        """Buffer values, sent in batches after every queued operation; the oldest go when the buffer is full."""
        if not self.accepting:
            return
        overflow = len(self._values) + len(items) - (self._values.maxlen or 0)
        if overflow > 0:
            if not self._overflowed:
                self._log.warning("%s: the buffer is full (%d values); the oldest are dropped until it "
                                  "answers again", self._dest.name, self._values.maxlen)
            self._overflowed += overflow
        self._values.extend(items)
        self._wake.set()

    def wait_open(self, timeout_s: float) -> None:
        """Wait until the destination is open, unless it is down or off, or `timeout_s` passes."""
        self._wait(lambda: self._opened, timeout_s)

    def flush(self, timeout_s: float) -> None:
        """Wait until everything queued is sent, unless the destination is down or `timeout_s` passes."""
        if self._thread is not None:
            self._wake.set()
            self._wait(self._idle, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Send what is queued, then stop the thread; False if it did not finish within `timeout_s`."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        self._closing = True
        self._wake.set()
        thread.join(timeout_s)
        if thread.is_alive():
            self._abandoned = True  # the thread leaves at its next wake-up; a request in flight ends on its own
            self._wake.set()
            return False
        return True

    def _idle(self) -> bool:
        return not (self._ops or self._values or self._inflight)

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: done() or self._state in ("down", "off"), timeout_s)

    # The thread's side: every call to the destination happens below.

    def _run(self) -> None:
        backoff = 1.0
        while not self._abandoned:
            self._wake.clear()
            closing = self._closing  # read first: whatever was put before close() is then in the queues
            try:
                if not self._opened:
                    self._open()
                self._drain()
            except Exception as e:  # the thread must outlive any failure; what it means is decided here
                if self._abandoned:
                    return
                if not self._dest.transient(e):
                    self._turn_off(e)
                    return
                self._set_state("down", e)
                self._wake.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            backoff = 1.0
            self._set_state("up")
            if closing:
                return
            self._wake.wait()

    def _open(self) -> None:
        first = self._dest.open()
        self._ops.extendleft(reversed(first))
        with self._cond:
            self._opened = True
            self._cond.notify_all()

    def _drain(self) -> None:
        """Send every queued operation, then every buffered value; a transient failure raises, keeping the item."""
        while self._ops or self._values or self._inflight:
            if self._ops:
                self._send(self._ops[0])
                self._ops.popleft()
            else:
                if not self._inflight:
                    n = min(self._batch_size, len(self._values))
                    self._inflight = [self._values.popleft() for _ in range(n)]
                self._send(self._pack(self._inflight))
                self._inflight = []
            self._set_state("up")  # it answered: says so once after an outage, and wakes whoever waits

    def _send(self, op: Op) -> None:
        try:
            self._dest.send(op)
        except Exception as e:  # a wrong operation is dropped; a transient failure is retried
            if self._dest.transient(e):
                raise
            self._log.warning("%s rejected %s (%s); skipping it", self._dest.name, type(op).__name__, one_line(e))

    def _set_state(self, state: State, error: BaseException | None = None) -> None:
        with self._cond:
            before, self._state = self._state, state
            self._cond.notify_all()
        if state == "down" and before != "down":
            self._log.warning("%s is unreachable (%s); everything stays buffered and is sent when it answers "
                              "again, training goes on", self._dest.name, one_line(error))
        elif state == "up" and before == "down":
            self._log.info("%s answers again; sending the %d values still buffered", self._dest.name, self.unsent)

    def _turn_off(self, error: BaseException) -> None:
        self._ops.clear()
        self._values.clear()
        self._inflight = []
        with self._cond:
            self._state = "off"
            self._cond.notify_all()
        self._log.warning("%s is off for the rest of this run: %s", self._dest.name, one_line(error))


def one_line(error: BaseException | None) -> str:
    """The first line of an error's message (at most 300 characters), or its type when it has none."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
