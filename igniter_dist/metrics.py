"""Metrics from step outputs: exact global means and torchmetrics metrics, accumulated on the device.

Nothing here reads a value back to the host per step; `compute()` is the one collective point and
every rank calls it together (at log and epoch boundaries, never in a rank-0-only branch).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, StepOutputError
from .spec import MetricSpec, StepOutput


class Metric:
    """Feed the step outputs named by `keys` to a torchmetrics metric.

    For example `ig.Metric(MulticlassAccuracy(num_classes=10), "logits", "labels")`.
    """

    def __init__(self, metric: Any, *keys: str):
        import torchmetrics

        if not isinstance(metric, torchmetrics.Metric):
            raise ConfigError(
                f"ig.Metric needs a torchmetrics.Metric instance, got {type(metric).__name__}; "
                "wrap your own computation in a torchmetrics.Metric or pass a function of the outputs."
            )
        if not keys:
            raise ConfigError(f"ig.Metric({type(metric).__name__}) needs the output keys it reads, "
                              "e.g. 'logits', 'labels'.")
        self.metric = metric
        self.keys = keys


class _Mean:
    """Sample-weighted running sum (on the device) and count (a host int) of one output.

    The count never touches the device: batch sizes and element counts are host integers, so an
    update is one fused device op and no host sync.
    """

    def __init__(self, name: str, source: str | Callable[[StepOutput], Any], device: torch.device):
        self.name = name
        self.source = source
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.count = 0

    def value_of(self, output: StepOutput) -> Any:
        if callable(self.source):
            return self.source(output)
        return output[self.source]

    def update(self, output: StepOutput, batch_size: int) -> None:
        v = self.value_of(output)
        if isinstance(v, torch.Tensor):
            v = v.detach()
            n = v.numel()
            if n == 1:  # a batch mean: counts with the batch size
                self.total.add_(v.reshape(()), alpha=batch_size)
                self.count += batch_size
            else:  # per-sample values: each element counts once
                self.total.add_(v.sum(dtype=self.total.dtype))
                self.count += n
        else:
            self.total.add_(float(v) * batch_size)
            self.count += batch_size

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


class MetricSet:
    """The metrics of one loop: updated every step, computed together across ranks on demand."""

    def __init__(self, specs: Mapping[str, MetricSpec] | None, device: torch.device, distributed: bool):
        self.device = device
        self.distributed = distributed
        self.means: list[_Mean] = []
        self.torchmetrics: dict[str, Metric] = {}
        self._checked = False
        for name, spec in (specs or {}).items():
            if isinstance(spec, Metric):
                spec.metric.to(device)
                spec.metric.persistent(True)
                self.torchmetrics[name] = spec
            elif isinstance(spec, str) or callable(spec):
                self.means.append(_Mean(name, spec, device))
            else:
                raise ConfigError(
                    f"Metric {name!r}: expected an output key (str), ig.Metric(...) or a function of the outputs, "
                    f"got {type(spec).__name__}."
                )

    def __bool__(self) -> bool:
        return bool(self.means or self.torchmetrics)

    def _check_first(self, output: StepOutput, where: str) -> None:
        available = ", ".join(map(repr, output)) or "none"
        needed = [(m.name, m.source) for m in self.means if isinstance(m.source, str)]
        needed += [(n, k) for n, m in self.torchmetrics.items() for k in m.keys]
        for name, key in needed:
            if key not in output:
                raise StepOutputError(
                    f"Metric {name!r} reads output {key!r}, which the {where} step did not return "
                    f"(it returned {available}); return it from the step or fix the metric spec."
                )
            v = output[key]
            if not isinstance(v, (torch.Tensor, numbers.Number)) or isinstance(v, bool):
                raise StepOutputError(
                    f"Metric {name!r} reads output {key!r} of the {where} step, which is a "
                    f"{type(v).__name__}; return a tensor or a number."
                )
        self._checked = True

    def update(self, output: StepOutput, batch_size: int, where: str = "training") -> None:
        if not self._checked:
            self._check_first(output, where)
        for m in self.means:
            m.update(output, batch_size)
        for spec in self.torchmetrics.values():
            spec.metric.update(*(_detach(output[k]) for k in spec.keys))

    def compute(self) -> dict[str, float]:
        """Collective: every rank gets the same global values (one all-reduce for all means)."""
        values: dict[str, float] = {}
        if self.means:
            totals = torch.stack([m.total for m in self.means])
            counts = torch.tensor([m.count for m in self.means], dtype=totals.dtype, device=totals.device)
            sums = torch.stack([totals, counts], dim=1)
            if self.distributed:
                dist.all_reduce(sums)
            for m, (total, count) in zip(self.means, sums.tolist(), strict=True):  # host sync: only at log time
                values[m.name] = total / count if count else float("nan")
        for name, spec in self.torchmetrics.items():
            v = spec.metric.compute()  # collective inside torchmetrics
            values[name] = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else _to_float(v, name)
        return values

    def reset(self) -> None:
        for m in self.means:
            m.reset()
        for spec in self.torchmetrics.values():
            spec.metric.reset()

    def state_dict(self) -> dict[str, Any]:
        """This rank's accumulators (per-rank state: ranks hold different partial sums)."""
        out: dict[str, Any] = {m.name: {"total": m.total, "count": m.count} for m in self.means}
        for name, spec in self.torchmetrics.items():
            out[name] = dict(spec.metric.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m in self.means:
            if m.name in state:
                m.total.copy_(state[m.name]["total"])
                m.count = int(state[m.name]["count"])
        for name, spec in self.torchmetrics.items():
            if name in state:
                spec.metric.load_state_dict(dict(state[name]), strict=False)


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _to_float(v: Any, name: str) -> float:
    raise StepOutputError(
        f"Metric {name!r} computed a {type(v).__name__} with {getattr(v, 'numel', lambda: '?')()} values; "
        "igniter-dist logs scalars: configure the torchmetrics metric to reduce to one number (e.g. average='macro')."
    )
