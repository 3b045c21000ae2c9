"""Training streams: loaders of unknown length, read across epochs, with this rank's position.

A stream's iterator lives until it ends, so an epoch cut short (by `epoch_length`, or by another
rank running out) continues where it stopped. With several ranks each batch is read one step ahead
and the ranks agree, in a non-blocking all-reduce overlapped with the step before it, that every
rank has one: all stop after the same step, since a rank without a batch could not join DDP's
backward. A checkpoint keeps the loader's (or its dataset's) `state_dict()` as it was before the
batch read ahead; a stream without one is resumed by reading and dropping what this rank trained
on in its current pass.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from itertools import count, islice
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .data import seed_workers, stream_position
from .runtime import Runtime
from .signals import start_iterator, stop_workers

_NOTHING = object()  # no batch read ahead
_END = object()  # the iterator ended


class HaveBatch:
    """Whether every rank has its next batch: a MIN all-reduce of one flag, launched before the step
    that it must not delay and waited on after it."""

    def __init__(self, group: Any = None):
        self.group = group  # a gloo group when the default one is nccl: the flag stays on the host
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work: Any = None

    def launch(self, have: bool) -> None:
        """Collective: start the agreement on this rank's answer (every rank launches as many)."""
        self._flag[0] = int(have)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MIN, group=self.group, async_op=True)

    def everyone(self) -> bool:
        """Wait for the agreement launched last; True when every rank has a batch."""
        self._work.wait()
        self._work = None
        return bool(self._flag.item())  # a finished host-side op: no device sync


class Stream:
    """This rank's training stream: its iterator across epochs, the batch read ahead, its position."""

    def __init__(self, loader: Iterable[Any], runtime: Runtime, *, seed: int, group: Any = None):
        self.loader = loader
        self.rank = runtime.rank
        self.seed = seed
        self.position = stream_position(loader)  # what has state_dict(), or None
        self.agreement = HaveBatch(group) if runtime.distributed else None
        self.runtime = runtime
        if isinstance(loader, DataLoader) and loader.generator is None:
            # Each iter() draws the workers' base seed from this generator, or else from the global RNG,
            # which a resumed run would then draw from at another moment than the uninterrupted one.
            loader.generator = torch.Generator()
        self.passes = 0  # iterators started; each is seeded from the count
        self.consumed = 0  # batches trained on from the current iterator
        self._it: Iterator[Any] | None = None
        self._ahead: Any = _NOTHING  # the batch read ahead, not trained on yet
        self._ahead_position: Any = None  # the position before reading it
        self._restored: Mapping[str, Any] | None = None  # loaded state, applied when the first iterator starts
        self._skip = 0  # batches to read and drop from the next iterator (a resume without a position)

    # ---------------------------------------------------------------- batches

    def batches(self, limit: int | None) -> Iterator[Any]:
        """Collective with several ranks: this epoch's batches, at most `limit`, the last one the same step
        on every rank (the first rank to run out ends the epoch for all)."""
        if limit == 0:
            return
        if self.agreement is None:
            for _ in range(limit) if limit is not None else count():
                batch = self._next()
                if batch is _END:
                    return
                self.consumed += 1
                yield batch
            return
        if self._ahead is _NOTHING or self._ahead is _END:
            self._read_ahead()
        self.agreement.launch(self._ahead is not _END)  # the epoch's first: waited for at once
        n = 0
        while self.agreement.everyone():
            batch, self._ahead = self._ahead, _NOTHING
            self.consumed += 1
            n += 1
            last = limit is not None and n >= limit
            if not last:  # read the next batch now; the agreement on it overlaps the step on this one
                self._read_ahead()
                self.agreement.launch(self._ahead is not _END)
            yield batch
            if last:
                return

    def _read_ahead(self) -> None:
        if self._it is None:
            self._start()
        # The position a checkpoint taken before the next step must hold: one call per step, streams only.
        self._ahead_position = self.position.state_dict() if self.position is not None else None
        self._ahead = self._next()

    def _next(self) -> Any:
        if self._it is None:
            self._start()
        assert self._it is not None
        try:
            return next(self._it)
        except StopIteration:
            self._it, self.consumed = None, 0
            return _END

    def _start(self) -> None:
        """A new iterator: a new pass, or the saved run's pass continued (its position loaded, or re-read)."""
        restored, self._restored = self._restored, None
        if restored is not None and self.position is not None and "position" in restored:
            self.position.load_state_dict(decode(restored["position"]))
        if restored is None or not restored["started"]:
            self.passes += 1
        if isinstance(self.loader, DataLoader):
            seed_workers(self.loader, self.seed, self.passes, self.rank)
        self._it = start_iterator(self.loader)
        if self._skip:  # no position kept: read and drop what this rank trained on in this pass
            deque(islice(self._it, self._skip), maxlen=0)
            self.consumed, self._skip = self._skip, 0

    def stop_workers(self) -> None:
        """Shut down the loader's worker processes (after a stop's save: they ignore the signal)."""
        stop_workers(self._it)

    # ---------------------------------------------------------------- resume

    def resume(self, step: int, iteration: int) -> None:
        """Collective when resumed (`step` > 0) with several ranks: settle what this rank re-reads, and say
        so once. A rank the checkpoint held no stream state for re-reads the epoch's `iteration` batches."""
        if step == 0:
            return
        if self._restored is None:
            self._skip = iteration
        skips = self.runtime.all_gather_object(self._skip)
        if self.runtime.is_main and any(skips):
            ranks = (f"each rank re-reads {skips[0]}" if len(set(skips)) == 1
                     else "ranks re-read " + ", ".join(str(n) for n in skips))
            print(f"igniter-dist: warning: the training stream keeps no position (neither its loader nor its "
                  f"dataset has state_dict()), so {ranks} batches it trained on already; give the dataset "
                  "state_dict()/load_state_dict() or use torchdata's StatefulDataLoader to resume without "
                  "re-reading.", file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: its pass, the batches trained on in it and, when kept, the loader's state
        before the batch read ahead."""
        pending = self._ahead is not _NOTHING and self._ahead is not _END
        state: dict[str, Any] = {"passes": self.passes, "consumed": self.consumed,
                                 "started": self._it is not None or pending}
        if self.position is not None:
            state["position"] = encode(self._ahead_position if pending else self.position.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._it is not None or self._ahead is not _NOTHING:
            return  # a live stream (debug mode's round trip) is already where the checkpoint says
        kept = self.position is not None and "position" in state
        self.passes = int(state["passes"])
        self.consumed = int(state["consumed"]) if kept else 0
        self._skip = 0 if kept else int(state["consumed"])
        self._restored = state


def encode(position: Any) -> Any:
    """A loader's state as the bytes of torch.save in a uint8 tensor, so the checkpoint keeps its exact
    structure (empty containers, integer keys, tuples). A state that weights_only could not load back
    stays as it is, for the checkpoint's own check to name the value."""
    buffer = io.BytesIO()
    torch.save(position, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError:
        return position
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode(saved: Any) -> Any:
    """The loader state `encode` stored (weights_only: a checkpoint never runs code)."""
    if not isinstance(saved, torch.Tensor):
        return saved
    return torch.load(io.BytesIO(saved.numpy().tobytes()), weights_only=True)
