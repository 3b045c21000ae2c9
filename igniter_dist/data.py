"""Sharded, resumable data: the user's plain DataLoader rebuilt so each rank reads its own shard, and
the pieces streams need to shard themselves and keep their position.

Training: one global permutation per epoch (from the seed), cut into strided per-rank shards and
padded by wrapping so every rank runs the same number of steps; it can start at any global sample
position without reading what it skips. Evaluation: every sample exactly once, no padding.
Streams (an IterableDataset, or any loader without a length) cannot be rebuilt: they shard
themselves with `shard_iterable`, and keep their position with `state_dict()`/`load_state_dict()`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sized
from itertools import islice
from typing import Any, TypeVar

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

from .errors import ConfigError
from .runtime import rank_and_world_size

T = TypeVar("T")


class ShardedSampler(Sampler[int]):
    """This rank's share of one epoch, shuffled per epoch from `seed`, resumable at a global position.

    The epoch's order is a permutation of the whole dataset; rank r takes every world_size-th
    index starting at r. `position` counts global samples already consumed in the epoch (a
    multiple of world_size), so a run resumed with another world size continues the same order.
    """

    def __init__(self, size: int, rank: int, world_size: int, *, shuffle: bool, seed: int):
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Select the epoch (its order) and the global sample position to start from."""
        if not 0 <= position <= self.size:
            raise ValueError(f"position {position} outside the epoch of {self.size} samples")
        self.epoch = epoch
        self.position = position

    def order(self) -> torch.Tensor:
        """The epoch's global order of sample indices (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def _shard(self) -> torch.Tensor:
        order = self.order()
        rest = order[self.position:]
        pad = -len(rest) % self.world_size
        if pad:  # wrap around to the epoch's first samples so every rank has the same length
            rest = torch.cat([rest, order[:pad].repeat(math.ceil(pad / max(1, len(order))))[:pad]])
        return rest[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard().tolist())

    def __len__(self) -> int:
        return math.ceil((self.size - self.position) / self.world_size)


class EvalShardSampler(Sampler[int]):
    """Every world_size-th sample from `rank`: each sample once across ranks, shards may differ by one."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size = size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _rebuild(loader: DataLoader, sampler: Sampler[int], generator: torch.Generator | None) -> DataLoader:
    kwargs = dict(
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs)


def _user_sharded(loader: DataLoader) -> bool:
    return isinstance(loader.sampler, (DistributedSampler, ShardedSampler, EvalShardSampler))


def _rebuildable(loader: DataLoader, what: str) -> bool:
    if isinstance(loader.dataset, IterableDataset):
        return False  # the dataset shards itself; nothing to rebuild
    if loader.batch_size is None:
        warnings.warn(f"The {what} loader uses a custom batch_sampler; igniter-dist leaves it as it is, "
                      "so it is neither sharded across ranks nor resumable mid-epoch.", stacklevel=3)
        return False
    if not isinstance(loader.dataset, Sized):
        raise ConfigError(f"The {what} loader's dataset has no len(); give it __len__ or make it an IterableDataset.")
    return not _user_sharded(loader)


def _size(loader: DataLoader) -> int:
    """The dataset's length (`_rebuildable` checked that it has one)."""
    assert isinstance(loader.dataset, Sized)
    return len(loader.dataset)


def shard_train_loader(loader: DataLoader, rank: int, world_size: int, seed: int) -> DataLoader:
    """Rebuild a training loader around a ShardedSampler (shuffled when the user asked for shuffle)."""
    if not _rebuildable(loader, "training"):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise ConfigError(
            f"The training loader's sampler {type(loader.sampler).__name__} cannot be sharded; "
            "pass shuffle=True/False instead, or a DistributedSampler that you manage yourself."
        )
    sampler = ShardedSampler(_size(loader), rank, world_size,
                             shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return _rebuild(loader, sampler, torch.Generator())


def shard_eval_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """Rebuild an evaluation loader so the ranks together see every sample exactly once."""
    if world_size == 1 or not _rebuildable(loader, "evaluation"):
        return loader
    return _rebuild(loader, EvalShardSampler(_size(loader), rank, world_size), None)


def train_sampler(loader: DataLoader) -> ShardedSampler | DistributedSampler | None:
    """The sampler whose epoch the engine sets, if the loader has one."""
    s = loader.sampler
    return s if isinstance(s, (ShardedSampler, DistributedSampler)) else None


def seed_workers(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Seed the generator DataLoader workers draw their seeds from, per epoch and rank.

    This keeps worker randomness reproducible after a resume and leaves the global RNG (dropout)
    untouched by iterator creation.
    """
    if loader.generator is not None:
        loader.generator.manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank)


def shard_iterable(iterable: Iterable[T], *, rank: int | None = None, world_size: int | None = None) -> Iterator[T]:
    """This rank's and this DataLoader worker's share of `iterable`: every N-th item, N the readers in all.

    Call it in an IterableDataset's `__iter__`, over shard files, records or indices. With W loader
    workers per rank there are `world_size * W` readers; reader `rank * W + worker` takes items
    `reader, reader + N, ...`, the same ones in every run. `rank` and `world_size` default to this
    process's (read without starting anything, so it works in a worker process too).
    """
    if rank is None or world_size is None:
        own_rank, own_world = rank_and_world_size()
        rank = own_rank if rank is None else rank
        world_size = own_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"shard_iterable got rank {rank} of world_size {world_size}; the rank must be from 0 to "
                          f"{world_size - 1}.")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return islice(iterable, rank * workers + worker, None, world_size * workers)


def is_stream(loader: Iterable[Any]) -> bool:
    """A loader of unknown length: its dataset is an IterableDataset, or it has no len()."""
    if isinstance(getattr(loader, "dataset", None), IterableDataset) or not isinstance(loader, Sized):
        return True
    try:
        len(loader)
    except TypeError:  # a DataLoader over a dataset without __len__
        return True
    return False


def stream_position(loader: Iterable[Any]) -> Any:
    """What keeps a stream's position, with state_dict()/load_state_dict(): the loader itself (torchdata's
    StatefulDataLoader, any such iterable), else its dataset when read in this process; None if nothing."""
    if _stateful(loader):
        return loader
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not _stateful(dataset):
        return None
    workers = getattr(loader, "num_workers", 0)
    if workers:
        raise ConfigError(
            f"The training dataset {type(dataset).__name__} keeps its position (state_dict) but its DataLoader "
            f"reads it in {workers} worker processes, where that position moves out of reach; use torchdata's "
            "StatefulDataLoader (which saves every worker's), or num_workers=0."
        )
    return dataset


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
