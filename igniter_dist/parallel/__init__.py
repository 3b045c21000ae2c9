"""Model wrapping by strategy: the device mesh, the sharding units and FSDP2's `fully_shard`.

Modules here are imported when a strategy needs them, so `import igniter_dist` does not pay for
torch.distributed.fsdp.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

Strategy = Literal["ddp", "fsdp", "hsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "hsdp")


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` sharded `module` (its root); never imports FSDP to find out."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a shard of a sharded tensor); never imports DTensor to find out."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)
