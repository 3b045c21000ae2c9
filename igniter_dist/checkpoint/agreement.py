"""Errors agreed on every rank: each rank offers its own (or None), and every rank raises the same one.

A check that can fail on one rank only (rank 0's listing, one rank's read of its shard) must fail
on all of them, or the others wait forever in their next collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, IgniterError

Gather = Callable[[Any], list[Any]]  # an all-gather of one picklable object per rank, by rank


def agree(gather: Gather, error: IgniterError | None, value: Any = None) -> list[Any]:
    """Collective through `gather`: every rank's `value`, by rank, unless some rank offered an error.

    Then every rank raises the first rank's error; a ConfigError comes before any other, because
    it names a bug that retrying (`on_error="warn"`) would only repeat.
    """
    gathered = gather((error, value))
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, ConfigError)), errors[0])
    return [v for _, v in gathered]
