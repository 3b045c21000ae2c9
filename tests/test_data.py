"""Sharded sampling: disjoint train shards, per-epoch reproducible shuffles, exact-once evaluation, resume."""

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from igniter_dist.data import EvalShardSampler, ShardedSampler, shard_eval_loader, shard_train_loader


def shards(n, world, epoch=0, seed=1, position=0, shuffle=True):
    out = []
    for r in range(world):
        s = ShardedSampler(n, r, world, shuffle=shuffle, seed=seed)
        s.set_epoch(epoch, position)
        out.append(list(s))
    return out


def test_train_shards_are_disjoint_and_cover_the_dataset_once():
    parts = shards(64, 2)
    assert len(parts[0]) == len(parts[1]) == 32
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(64))


def test_uneven_train_shards_pad_by_wrapping_so_ranks_run_equal_steps():
    parts = shards(65, 2)
    assert len(parts[0]) == len(parts[1]) == 33
    assert set(parts[0]) | set(parts[1]) == set(range(65))
    assert len(parts[0] + parts[1]) - 65 == 1  # exactly one repeated sample


def test_order_changes_with_epoch_and_is_reproducible_from_seed():
    assert shards(64, 2, epoch=0) == shards(64, 2, epoch=0)
    assert shards(64, 2, epoch=0) != shards(64, 2, epoch=1)
    assert shards(64, 2, epoch=0, seed=1) != shards(64, 2, epoch=0, seed=2)


def test_start_mid_epoch_continues_the_same_order():
    full = shards(64, 2)
    resumed = shards(64, 2, position=16)  # 16 global samples = 8 per rank consumed
    assert resumed == [full[0][8:], full[1][8:]]


def test_resume_with_another_world_size_reads_each_remaining_sample_once():
    before = shards(64, 2)
    consumed = set(before[0][:8] + before[1][:8])
    after = shards(64, 1, position=16)[0]
    assert len(after) == 48 and set(after) == set(range(64)) - consumed


def test_eval_sampler_covers_every_sample_exactly_once_without_padding():
    n, world = 37, 2
    parts = [list(EvalShardSampler(n, r, world)) for r in range(world)]
    assert sorted(parts[0] + parts[1]) == list(range(n))
    assert (len(parts[0]), len(parts[1])) == (19, 18)


def test_loaders_are_rebuilt_keeping_the_users_settings():
    ds = TensorDataset(torch.arange(50))
    user = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    train = shard_train_loader(user, rank=1, world_size=2, seed=3)
    assert isinstance(train.sampler, ShardedSampler) and train.sampler.shuffle
    assert train.batch_size == 4 and train.drop_last and train.sampler.rank == 1
    ev = shard_eval_loader(DataLoader(ds, batch_size=8), rank=0, world_size=2)
    assert isinstance(ev.sampler, EvalShardSampler)
    assert sum(len(b[0]) for b in ev) == 25


def test_a_users_distributed_sampler_is_left_alone():
    ds = TensorDataset(torch.arange(10))
    sampler: DistributedSampler = DistributedSampler(ds, num_replicas=2, rank=0)
    user = DataLoader(ds, batch_size=2, sampler=sampler)
    assert shard_train_loader(user, 0, 2, seed=1) is user
    assert shard_eval_loader(user, 0, 2) is user
