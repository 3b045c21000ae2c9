"""Sharded checkpoints on any fsspec URL: DCP writes, a manifest commits, rank 0 decides "latest".

Names are imported on first use, so `igniter-dist checkpoints --help` and `import igniter_dist`
do not pay for torch.distributed.checkpoint.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import export_model
    from .manager import CheckpointManager, LoadResult

__all__ = ["CheckpointManager", "LoadResult", "export_model"]
_HOMES = {"CheckpointManager": ".manager", "LoadResult": ".manager", "export_model": ".export"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
