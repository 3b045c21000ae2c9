"""Model wrapping by strategy: the device mesh, the sharding units and FSDP2's `fully_shard`.

Modules here are imported when a strategy needs them, so `import igniter_dist` does not pay for
torch.distributed.fsdp.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal, TypeGuard, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

Strategy = Literal["ddp", "fsdp", "hsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "hsdp")


def unwrap_chain(model: nn.Module) -> list[nn.Module]:
    """`model` and every module it wraps (DDP's `module`, torch.compile's `_orig_mod`), outermost first."""
    chain = [model]
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return chain
        chain.append(model)


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` sharded `module` (its root); never imports FSDP to find out."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether `t` is a DTensor (a shard of a sharded tensor); never imports DTensor to find out."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Whether a sharded module reduce-scatters its gradients in the next backward (FSDP's `no_sync`)."""
    cast("FSDPModule", module).set_requires_gradient_sync(enabled)


def reshard(module: nn.Module) -> None:
    """Free a sharded module's gathered parameters: after a forward the root keeps them until its backward."""
    cast("FSDPModule", module).reshard()
