"""The closing summary rank 0 prints: wall time, steps, evaluation metrics and where everything went."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

from .base import Progress, RunInfo, RunStatus, Sink
from .console import format_value

if TYPE_CHECKING:
    from ..checkpoint.retention import KeepBest


class SummarySink:
    """Remembers what the run did and prints it in a few lines once the run ends.

    It learns everything through the sink calls the engine makes anyway: the last step from
    `progress`, evaluation results from `log_metrics` (any metric not under `train/`), the model file
    from `log_artifact` and the latest checkpoint from the `checkpoint` tag. `tracking` is the sink
    whose run id names the MLflow run (the fan-out, which learns it only once MLflow answers).
    """

    run_id: str | None = None
    live = False  # the step comes with each log call and with the stop on a signal

    def __init__(self, tracking: Sink, best: KeepBest | None = None, stream: TextIO | None = None):
        self._tracking = tracking
        self._best_spec = best
        self._stream = stream
        self._start = time.monotonic()
        self._first_step: int | None = None
        self._step = 0
        self._epoch: tuple[int, int | None] = (0, None)
        self._last_eval: dict[str, float] = {}
        self._best: tuple[float, int] | None = None
        self._model: str | None = None
        self._checkpoint: str | None = None

    def start(self, info: RunInfo) -> None:
        self._step = self._first_step = info.resumed_step

    def progress(self, p: Progress) -> None:
        self._step, self._epoch = p.step, (p.epoch, p.max_epochs)

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        evaluated = {k: v for k, v in metrics.items() if not k.startswith("train/") and "/" in k}
        if not evaluated:
            return
        self._last_eval = evaluated
        spec = self._best_spec
        if spec is not None and spec.metric in evaluated:
            value = evaluated[spec.metric]
            if self._best is None or spec.better(value, self._best[0]):
                self._best = (value, step)

    def log_artifact(self, path: str) -> None:
        if os.path.basename(path).startswith("model.") and self._model is None:
            self._model = path

    def set_tag(self, key: str, value: str) -> None:
        if key == "checkpoint":
            self._checkpoint = value

    def flush(self) -> None:
        pass

    def close(self, status: RunStatus) -> None:
        if status == "FAILED":
            return  # the error says what happened
        try:
            print("\n".join(self.lines(status)), file=self._stream or sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: nothing to tell

    def lines(self, status: RunStatus) -> list[str]:
        """The summary as printed: a headline, then one line per fact the run has."""
        done = "finished" if status == "FINISHED" else "stopped"
        trained = self._step - (self._first_step or 0)
        since = f", {trained} in this run" if self._first_step else ""
        epoch = f", epoch {self._epoch[0]}/{self._epoch[1]}" if self._epoch[1] else ""
        out = [f"igniter-dist: {done} in {wall_time(time.monotonic() - self._start)} at step {self._step}"
               f"{since}{epoch}"]
        if self._last_eval:
            out.append("  last evaluation: " + " ".join(f"{k} {format_value(v)}" for k, v in self._last_eval.items()))
        if self._best is not None and self._best_spec is not None:
            out.append(f"  best {self._best_spec.metric}: {format_value(self._best[0])} at step {self._best[1]}")
        if self._model:
            out.append(f"  model: {self._model}")
        if self._checkpoint:
            out.append(f"  latest checkpoint: {self._checkpoint}")
        if self._tracking.run_id:
            out.append(f"  MLflow run: {self._tracking.run_id}")
        return out


def wall_time(seconds: float) -> str:
    """Elapsed time as people read it: 8.4 s, 3 min 07 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
