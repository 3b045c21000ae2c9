"""Sharded checkpoints on any fsspec URL: DCP writes, a manifest commits, rank 0 decides "latest"."""

from __future__ import annotations

from .export import export_model
from .manager import CheckpointManager, LoadResult

__all__ = ["CheckpointManager", "LoadResult", "export_model"]
