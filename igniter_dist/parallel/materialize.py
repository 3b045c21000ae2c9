"""Materialising a model built on the meta device after it is sharded, so it never exists whole.

Each module that owns parameters or buffers is initialised in turn (its `reset_parameters()`, or
the user's `init(module)`) on whole tensors of its own, and each rank keeps its shard of them: at
most one module's tensors exist whole at a time. Every rank draws from rank 0's random state, so
the shards fit together into the model that the same seed builds eagerly, one module after another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from itertools import chain
from typing import cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import ConfigError
from ..runtime import Runtime

Init = Callable[[nn.Module], None]


def on_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device; ConfigError when only part of it was."""
    tensors = list(chain(model.parameters(), model.buffers()))
    meta = [t.is_meta for t in tensors]
    if any(meta) and not all(meta):
        raise ConfigError(
            f"{sum(meta)} of the model's {len(meta)} parameters and buffers are on the meta device and the others "
            "are not; build the whole model under `with torch.device('meta'):` or none of it."
        )
    return bool(meta) and all(meta)


def materialize(model: nn.Module, rt: Runtime, *, param_device: torch.device, init: Init | None = None) -> None:
    """Collective (broadcasts rank 0's random state): allocate a meta model's tensors and initialise them.

    Shards go to `param_device` (the CPU under CPU offload), buffers and the whole tensors that
    initialisation fills to the rank's device.
    """
    _check_initialisable(model, init)
    model.to_empty(device=param_device)
    if param_device != rt.device:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(rt.device)
    with torch.no_grad(), _rank0_random_state(rt):
        for module in model.modules():
            if not _owns_tensors(module):
                continue
            with _whole(module, rt.device):
                if init is not None:
                    init(module)
                else:
                    cast(Callable[[], None], module.reset_parameters)()


def _check_initialisable(model: nn.Module, init: Init | None) -> None:
    if init is not None:
        return
    lacking = sorted({type(m).__name__ for m in model.modules()
                      if _owns_tensors(m) and not callable(getattr(m, "reset_parameters", None))})
    if lacking:
        raise ConfigError(
            f"The model was built on the meta device but {', '.join(lacking)} "
            f"{'has' if len(lacking) == 1 else 'have'} parameters or buffers and no reset_parameters(); "
            "pass ig.prepare(model, init=fn) with fn(module) initialising a module's own tensors."
        )


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in chain(module.parameters(recurse=False), module.buffers(recurse=False)))


@contextlib.contextmanager
def _whole(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Swap the module's sharded parameters for whole ones while it is initialised, then keep this
    rank's shard of each. Plain parameters (one process) are initialised where they are."""
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    whole = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
             for name, p in sharded.items()}
    module._parameters.update(whole)
    try:
        yield
    finally:
        module._parameters.update(sharded)
    for name, p in sharded.items():
        # No communication: every rank holds the same whole tensor and cuts out its own shard.
        mine = distribute_tensor(whole[name].detach(), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(mine.to_local())


@contextlib.contextmanager
def _rank0_random_state(rt: Runtime) -> Iterator[None]:
    """Run with rank 0's CPU (and CUDA) random state on every rank; each rank's own state is restored after."""
    cuda = rt.device.type == "cuda"
    with torch.random.fork_rng(devices=[rt.device] if cuda else []):
        cpu_state, cuda_state = rt.broadcast_object(
            (torch.get_rng_state(), torch.cuda.get_rng_state(rt.device) if cuda else None))
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, rt.device)
        yield
