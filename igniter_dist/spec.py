"""What to run: a step function, a loader, the metrics to compute from the step's outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .engine import Engine
    from .metrics import Metric

StepOutput = Mapping[str, Any]
StepFn = Callable[["Engine", Any], StepOutput]
MetricSpec = Union[str, "Metric", Callable[[StepOutput], "torch.Tensor"]]


@dataclass
class RunSpec:
    """One loop: `step(engine, batch)` over `loader`, with `metrics` computed from the step's outputs.

    `metrics` maps a metric name to a step output key (its global, sample-weighted mean), an
    `ig.Metric` wrapping a torchmetrics metric, or a callable `fn(outputs) -> tensor` averaged
    like a key. `max_epochs` and `epoch_length` apply to training; `max_epochs` defaults to 1, or
    to no limit when `ig.train` gets `max_steps`; `epoch_length` caps the iterations of an epoch
    (default: one pass over the loader).
    """

    step: StepFn
    loader: Iterable[Any]
    metrics: dict[str, MetricSpec] | None = None
    max_epochs: int | None = None
    epoch_length: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.step):
            raise ConfigError(f"RunSpec.step must be a function step(engine, batch), got {type(self.step).__name__}.")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"RunSpec.max_epochs must be at least 1, got {self.max_epochs}.")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ConfigError(f"RunSpec.epoch_length must be at least 1, got {self.epoch_length}.")
        if self.metrics is not None and not isinstance(self.metrics, Mapping):
            raise ConfigError(f"RunSpec.metrics must be a dict of name -> spec, got {type(self.metrics).__name__}.")
