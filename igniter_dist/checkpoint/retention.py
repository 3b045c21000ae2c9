"""Which committed checkpoints to keep: the newest `n_saved`, plus the best by one metric."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

# The engine logs training metrics as `train/<name>` and each evaluator's as `<evaluator>/<name>`.
TRAINING_PREFIX = "train/"


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


def unlogged_metric(keep_best: KeepBest | None, metrics: Mapping[str, float] | None) -> str | None:
    """Pure: why `keep_best` can never choose, once the metrics logged so far show it: an evaluation
    has logged its metrics (or the metric's own group has) without it. None while it may still come.
    """
    if keep_best is None or not metrics or keep_best.metric in metrics:
        return None
    group = keep_best.metric.split("/", 1)[0] + "/"
    evaluated = any(not name.startswith(TRAINING_PREFIX) for name in metrics)
    if not evaluated and not any(name.startswith(group) for name in metrics):
        return None
    return (f"--keep-best {keep_best.metric}:{keep_best.mode} names a metric that is not logged (logged: "
            f"{', '.join(sorted(metrics))}); pass one of these")
