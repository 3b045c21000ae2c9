"""A load plan that reads each live tensor from the one stored chunk that is exactly its own.

Loading on the world size and strategy that saved, every live shard is a whole stored chunk. DCP's
default plan computes each DTensor's local chunk (0.05 ms each) and sweeps all stored chunks for
overlaps; for the 212 tensors of a 306 MB fsdp shard that is 0.02 s of a 0.13 s load. Here a
chunk is computed once per shape, mesh and placement, and an exact match becomes its read item
directly. Anything else (resharding, empty shards, ShardedTensors, values) goes through DCP's
own functions, so the plan is always the one DCP would make (tests/test_checkpoint_load_plan.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial

ChunkKey = tuple[Any, ...]


def local_load_plan(state_dict: dict[str, Any], metadata: Metadata, strict: bool = True
                    ) -> tuple[LoadPlan, dict[MetadataIndex, torch.Tensor]]:
    """DCP's local load plan for the flat `state_dict`, and the live tensor of each whole-chunk read.

    Same items, in the same order, as `create_default_local_load_plan`."""
    items: list[ReadItem] = []
    destinations: dict[MetadataIndex, torch.Tensor] = {}
    chunks: dict[ChunkKey, ChunkStorageMetadata] = {}
    for fqn, obj in state_dict.items():
        md = metadata.state_dict_metadata.get(fqn)
        local = _local_tensor(obj)
        if not isinstance(md, TensorStorageMetadata) or local is None or md.size != obj.size():
            # Missing keys, size mismatches and values: DCP's own checks and items.
            items += create_default_local_load_plan({fqn: obj}, metadata, strict).items
            continue
        chunk = _chunk(obj, chunks)
        item = _whole_chunk_read(fqn, md, chunk)
        if item is None:
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        else:
            items.append(item)
            destinations[item.dest_index] = local
    return LoadPlan(items), destinations


def _local_tensor(obj: Any) -> torch.Tensor | None:
    """The tensor `obj` keeps on this rank, when its chunk follows from shape, mesh and placements."""
    if isinstance(obj, DTensor):
        local = obj._local_tensor
        if (type(local) is not torch.Tensor or obj.device_mesh.get_coordinate() is None
                or any(isinstance(p, Partial) for p in obj.placements)):
            return None
        return local
    return obj if type(obj) is torch.Tensor else None


def _chunk(obj: torch.Tensor, cache: dict[ChunkKey, ChunkStorageMetadata]) -> ChunkStorageMetadata:
    """This rank's chunk of `obj`: the whole tensor, or a DTensor's shard (cached by layout)."""
    if not isinstance(obj, DTensor):
        return ChunkStorageMetadata(offsets=torch.Size([0] * obj.dim()), sizes=obj.size())
    key = (obj.size(), obj.device_mesh, obj.placements)
    chunk = cache.get(key)
    if chunk is None:
        chunk = cache[key] = obj.__create_chunk_list__()[0]
    return chunk


def _whole_chunk_read(fqn: str, md: TensorStorageMetadata, local: ChunkStorageMetadata) -> ReadItem | None:
    """The read DCP makes when stored chunk == local chunk and no other stored chunk overlaps it."""
    if 0 in local.sizes:
        return None  # an empty shard: DCP reads nothing for it
    found = None
    for index, stored in enumerate(md.chunks):
        if stored.offsets == local.offsets and stored.sizes == local.sizes:
            found = index
        elif _overlap(stored, local):
            return None
    if found is None:
        return None
    zeros = torch.Size([0] * len(local.offsets))
    return ReadItem(type=LoadItemType.TENSOR,
                    dest_index=MetadataIndex(fqn, local.offsets, 0), dest_offsets=zeros,
                    storage_index=MetadataIndex(fqn, local.offsets, found), storage_offsets=zeros,
                    lengths=torch.Size(local.sizes))


def _overlap(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> bool:
    return all(ao < bo + bs and bo < ao + as_
               for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True))
