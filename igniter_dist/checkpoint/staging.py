"""Staging for async saves: copy this rank's share of the state off the training tensors, fast.

The loop waits only for this copy, so it copies as little as it can: under DDP every rank holds
the same model and optimizer tensors, and DCP writes each replicated tensor from one rank only,
so each rank stages just the tensors it will write. Who writes what is decided here, from the
tensors' paths, shapes and dtypes, identically on every rank; the ranks first agree that these
are the same everywhere (`fingerprint`), and stage everything when they are not. A sharded
tensor (a DTensor, under fsdp or hsdp) is this rank's own shard: every rank stages its own. Copies
go into buffers kept from the previous save, so a save does not fault in fresh memory.
"""

from __future__ import annotations

import zlib
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor

from .state import PER_RANK_PREFIX

Path = tuple[Any, ...]


def shared_tensors(sd: dict[str, Any]) -> dict[Path, torch.Tensor]:
    """The tensors of `sd` that every rank holds (not per-rank state), by their path of dict keys.

    Tensors inside lists or tuples are left out: every rank stages those (DCP still writes each once).
    So are DTensors: their shape is the whole tensor's on every rank, but each rank holds its own shard.
    """
    found: dict[Path, torch.Tensor] = {}

    def walk(value: Any, path: Path) -> None:
        if isinstance(value, DTensor):
            return
        if isinstance(value, torch.Tensor):
            found[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))

    for name, value in sd.items():
        if not name.startswith(PER_RANK_PREFIX):
            walk(value, (name,))
    return found


def fingerprint(tensors: dict[Path, torch.Tensor]) -> int:
    """A checksum of the paths, shapes and dtypes: equal on all ranks when they hold the same tensors."""
    text = "\n".join(f"{p!r}:{tuple(t.shape)}:{t.dtype}" for p, t in sorted(tensors.items(), key=lambda i: repr(i[0])))
    return zlib.crc32(text.encode())


def owners(tensors: dict[Path, torch.Tensor], world_size: int) -> dict[Path, int]:
    """The rank that writes each tensor: largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world_size
    owner: dict[Path, int] = {}
    for path, t in sorted(tensors.items(), key=lambda i: (-i[1].numel() * i[1].element_size(), repr(i[0]))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[path] = rank
        load[rank] += t.numel() * t.element_size()
    return owner


class Stager:
    """Copies state dicts to CPU for a background write, reusing its buffers from one save to the next.

    Only one staged copy is alive at a time: the caller writes it before staging the next.
    """

    def __init__(self) -> None:
        self._buffers: dict[Path, torch.Tensor] = {}

    def stage(self, sd: dict[str, Any], skip: set[Path] | frozenset[Path] = frozenset()) -> dict[str, Any]:
        """A copy of `sd` whose tensors are CPU copies, without the tensors at the paths in `skip`."""
        used: dict[Path, torch.Tensor] = {}
        copies_from_device = False

        def copy(value: Any, path: Path, in_dict: bool) -> Any:
            nonlocal copies_from_device
            if isinstance(value, DTensor):
                return copy_shard(value, path if in_dict else (*path, "#"))
            if isinstance(value, torch.Tensor):
                key = path if in_dict else (*path, "#")
                buf = self._buffers.get(key)
                src = value.detach()
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or buf.is_pinned() != src.is_cuda:
                    buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                buf.copy_(src, non_blocking=src.is_cuda)
                copies_from_device |= src.is_cuda
                used[key] = buf
                return buf
            if isinstance(value, dict):
                return {k: copy(v, (*path, k), in_dict) for k, v in value.items()
                        if not (in_dict and (*path, k) in skip)}
            if isinstance(value, (list, tuple)):
                items = [copy(v, (*path, i), False) for i, v in enumerate(value)]
                return items if isinstance(value, list) else tuple(items)
            return value

        def copy_shard(value: DTensor, key: Path) -> DTensor:
            """This rank's shard, staged as a DTensor of the same mesh and placements with a CPU shard."""
            nonlocal copies_from_device
            local = value.to_local().detach()
            buf = self._buffers.get(key)
            if (not isinstance(buf, DTensor) or buf.shape != value.shape or buf.dtype != value.dtype
                    or buf.placements != value.placements or buf.to_local().shape != local.shape):
                # DCP reads the shard's place in the whole tensor from the staged DTensor's mesh and placements.
                buf = cast(DTensor, value.detach().to("cpu", copy=True))
            else:
                buf.to_local().copy_(local, non_blocking=local.is_cuda)
            copies_from_device |= local.is_cuda
            used[key] = buf
            return buf

        staged = {name: copy(value, (name,), True) for name, value in sd.items() if (name,) not in skip}
        if copies_from_device:
            torch.cuda.synchronize()  # the non-blocking copies must land before the write reads them
        self._buffers = used  # buffers of tensors that are gone are freed
        return staged
