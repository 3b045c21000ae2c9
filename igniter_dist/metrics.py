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


SLOTS = 64  # step values a mean buffers on the device before folding them into its sum


class _Mean:
    """Sample-weighted running sum (on the device) and count (a host int) of one output.

    A step costs one in-place copy: its value goes into the next slot of a preallocated device buffer
    (no allocation, no host sync; the value is read at once, so the step may reuse its output's
    memory afterwards, as CUDA graphs do). A value on the CPU is read with `item()` instead and, on a
    CPU run, stored through the buffer's numpy view: the same float64 bits, no operation dispatched.
    The buffered values share one batch size and are folded into the float64 sum, weighted by it,
    when the buffer fills and before any read of the sum; a batch of another size is added at once,
    and so are per-sample values (each element counts once).
    """

    def __init__(self, name: str, source: str | Callable[[StepOutput], Any], device: torch.device):
        self.name = name
        self.source = source
        self._key = source if isinstance(source, str) else ""
        self._fn: Callable[[StepOutput], Any] | None = None if isinstance(source, str) else source
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.count = 0
        self._buffer = torch.zeros(SLOTS, dtype=dtype, device=device)
        self._slots = self._buffer.unbind()  # one 0-dim view per slot, made once
        self._filled = 0
        self._weight = 0  # the batch size of the buffered values
        # A CPU run's buffer, as numpy: a host value goes in by a store, without dispatching an operation.
        self._host_slots = self._buffer.numpy() if device.type == "cpu" else None

    def value_of(self, output: StepOutput) -> Any:
        return output[self._key] if self._fn is None else self._fn(output)

    def update(self, output: StepOutput, batch_size: int) -> None:
        v = output[self._key] if self._fn is None else self._fn(output)  # value_of, inlined: it runs every step
        if isinstance(v, torch.Tensor):
            if v.ndim and v.numel() != 1:  # per-sample values: each element counts once
                self.total.add_(v.detach().sum(dtype=self.total.dtype))
                self.count += v.numel()
                return
            if v.is_cpu:
                v = v.item()  # a host value (any CPU run, or a CPU value on a GPU run): a read, not a device sync
            else:
                v = v.data  # without its autograd graph: a shallow copy, cheaper than dispatching detach()
                v = v.reshape(()) if v.ndim else v
        self.count += batch_size
        if batch_size != self._weight:
            if self._filled:  # another batch size (an epoch's last batch): add it at once
                self.total.add_(v if isinstance(v, torch.Tensor) else float(v), alpha=batch_size)
                return
            self._weight = batch_size
        if isinstance(v, torch.Tensor):
            self._slots[self._filled].copy_(v)
        elif self._host_slots is not None:
            self._host_slots[self._filled] = float(v)
        else:
            self._slots[self._filled].fill_(float(v))
        self._filled += 1
        if self._filled == SLOTS:
            self.fold()

    def fold(self) -> None:
        """Add the buffered values, times their batch size, to the sum (device ops only)."""
        if self._filled:
            values = self._buffer if self._filled == SLOTS else self._buffer[:self._filled]
            self.total.add_(values.sum(), alpha=self._weight)
            self._filled = 0

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0
        self._filled = 0

    def state_dict(self) -> dict[str, Any]:
        # The buffer is saved unfolded, so a resumed run adds the same numbers in the same order.
        return {"total": self.total, "count": self.count, "buffer": self._buffer, "filled": self._filled,
                "weight": self._weight}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total.copy_(state["total"])
        self.count = int(state["count"])
        self._filled = int(state.get("filled", 0))  # checkpoints before the buffer have none
        self._weight = int(state.get("weight", 0))
        if self._filled:
            self._buffer.copy_(state["buffer"])


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

    def per_step(self) -> Callable[[StepOutput, int], None]:
        """The update to call every step: a single mean's own once the first outputs are checked (one frame
        fewer between two steps), else `update`."""
        if self._checked and len(self.means) == 1 and not self.torchmetrics:
            return self.means[0].update
        return self.update

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
            for m in self.means:
                m.fold()
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
        out: dict[str, Any] = {m.name: m.state_dict() for m in self.means}
        for name, spec in self.torchmetrics.items():
            out[name] = dict(spec.metric.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m in self.means:
            if m.name in state:
                m.load_state_dict(state[m.name])
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
