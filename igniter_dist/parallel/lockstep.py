"""Evaluation batches in lockstep, for models whose forward is a collective (fsdp, hsdp).

Evaluation shards may differ by a batch, and a rank that stops early would leave the others
waiting in their next forward's all-gather. Every rank runs as many forwards as the rank with the
most batches; one whose shard ran out replays a batch it already has, and that batch is marked
not counted, so metrics still see every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Any

from ..runtime import Runtime

_END = object()


def lockstep(batches: Iterable[Any], length: int | None, rt: Runtime) -> Iterator[tuple[Any, bool]]:
    """Collective: `(batch, counted)` pairs, as many on every rank.

    `length` is this rank's number of batches when known (a DataLoader's len): the ranks then agree
    once, up front; without it they agree before every batch.
    """
    lengths = rt.all_gather_object(length)
    if all(n is not None for n in lengths):
        return _by_length(iter(batches), lengths, rt)
    return _by_step(iter(batches), rt)


def _by_length(batches: Iterator[Any], lengths: list[int], rt: Runtime) -> Iterator[tuple[Any, bool]]:
    mine, most = lengths[rt.rank], max(lengths)
    spare: Any = None
    if min(lengths) == 0 < most:  # a rank without any batch replays the first batch of a rank with the most
        donor = lengths.index(most)
        head = next(batches) if rt.rank == donor else None
        spare = rt.broadcast_object(head, src=donor)
        if rt.rank == donor:
            batches = chain([head], batches)
    done = 0
    for batch in islice(batches, mine):
        spare, done = batch, done + 1
        yield batch, True
    for _ in range(most - done):
        yield spare, False


def _by_step(batches: Iterator[Any], rt: Runtime) -> Iterator[tuple[Any, bool]]:
    spare: Any = None
    while True:
        batch = next(batches, _END)
        has = batch is not _END
        states = rt.all_gather_object((has, has or spare is not None))
        if not any(h for h, _ in states):
            return
        if not all(ready for _, ready in states):  # someone has nothing to replay yet: the first with a batch lends one
            donor = next(r for r, (h, _) in enumerate(states) if h)
            lent = rt.broadcast_object(batch if rt.rank == donor else None, src=donor)
            spare = spare if spare is not None or has else lent
        if has:
            spare = batch
            yield batch, True
        else:
            yield spare, False
