"""The small interface between the engine and every metrics sink, and the fan-out over several."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..redaction import redact

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


@dataclass(frozen=True)
class RunInfo:
    """What a sink learns once, at start. `params` are redacted here, unless `redact` made them already."""

    params: Mapping[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    output_dir: str | None = None
    resumed_step: int = 0
    run_id: str | None = None  # a tracking run to continue (from a checkpoint), if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", redact(self.params))


@dataclass(slots=True)  # built every step while a bar is live: a plain slotted class is the cheapest to create
class Progress:
    """Where the loop is: handed to sinks every step while one is `live`, else before each log call."""

    step: int  # global iteration, 1-based after the first step
    epoch: int  # 1-based
    iteration: int  # 1-based within the epoch
    epoch_length: int | None
    max_epochs: int | None  # None: --max-steps alone ends the run
    optimizer_step: int = 0
    max_steps: int | None = None


class Sink(Protocol):
    """A destination for metrics. Called on rank 0 only; must never raise into the loop."""

    # Whether `progress` must come every training step (a live bar; keep it cheap), rather than at the
    # run's first step and before each `log_metrics` of training metrics.
    live: bool

    def start(self, info: RunInfo) -> None: ...

    def progress(self, p: Progress) -> None: ...

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        """Evaluator `name` has read `batch` of its `total` batches on this rank (None: unknown)."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None: ...

    def log_artifact(self, path: str) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: RunStatus) -> None: ...

    @property
    def run_id(self) -> str | None: ...


class NullSink:
    """The sink of ranks that do not log: every call does nothing."""

    run_id: str | None = None
    live = False

    def start(self, info: RunInfo) -> None:
        pass

    def progress(self, p: Progress) -> None:
        pass

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, status: RunStatus) -> None:
        pass


class Sinks:
    """Fans every call out to several sinks, in order."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.live = any(s.live for s in sinks)

    @property
    def run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if s.run_id), None)

    def start(self, info: RunInfo) -> None:
        for s in self.sinks:
            s.start(info)

    def progress(self, p: Progress) -> None:
        for s in self.sinks:
            s.progress(p)

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        for s in self.sinks:
            s.eval_progress(name, batch, total)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for s in self.sinks:
            s.log_metrics(metrics, step, epoch)

    def log_artifact(self, path: str) -> None:
        for s in self.sinks:
            s.log_artifact(path)

    def set_tag(self, key: str, value: str) -> None:
        for s in self.sinks:
            s.set_tag(key, value)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self, status: RunStatus) -> None:
        for s in self.sinks:
            s.close(status)
