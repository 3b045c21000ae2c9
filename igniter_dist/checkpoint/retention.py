"""Which committed checkpoints to keep: the newest `n_saved`, plus the best by one metric."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError


@dataclass(frozen=True)
class KeepBest:
    """`--keep-best eval/accuracy:max`: keep the checkpoint whose manifest metric is best."""

    metric: str
    mode: Literal["max", "min"]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


def parse_keep_best(spec: str | None) -> KeepBest | None:
    """Parse `NAME:max` or `NAME:min`; None or an empty string means no best checkpoint is kept."""
    if spec is None or not str(spec).strip():
        return None
    name, sep, mode = str(spec).strip().rpartition(":")
    mode = mode.strip().lower()
    if not sep or not name.strip() or mode not in ("max", "min"):
        raise ConfigError(
            f"--keep-best expects NAME:max or NAME:min (for example eval/accuracy:max), got {spec!r}."
        )
    return KeepBest(name.strip(), "max" if mode == "max" else "min")


def choose_kept(metrics_by_step: dict[int, dict[str, float]], n_saved: int,
                keep_best: KeepBest | None) -> set[int]:
    """Pure: the committed steps to keep, given each committed step's manifest metrics.

    The newest committed step is always kept, whatever `n_saved` says.
    """
    steps = sorted(metrics_by_step)
    if not steps:
        return set()
    kept = set(steps[-max(1, n_saved):])
    if keep_best is not None:
        best: int | None = None
        for step in steps:
            value = metrics_by_step[step].get(keep_best.metric)
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            # Ties go to the newer step: it carries the most training.
            if best is None or not keep_best.better(metrics_by_step[best][keep_best.metric], value):
                best = step
        if best is not None:
            kept.add(best)
    return kept
