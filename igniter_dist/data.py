"""Sharded, resumable sampling: the user's plain DataLoader rebuilt so each rank reads its own shard.

Training: one global permutation per epoch (from the seed), cut into strided per-rank shards and
padded by wrapping so every rank runs the same number of steps; it can start at any global sample
position without reading what it skips. Evaluation: every sample exactly once, no padding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from .errors import ConfigError


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
