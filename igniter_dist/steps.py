"""What a training step needs to be correct under DDP and FSDP: precision, accumulation, clipping.

The engine owns one `GradientStepper`; user steps reach it through `engine.backward(loss)`,
`engine.optimizer_step(optimizer)` and `engine.autocast()`. Plain `loss.backward()` and
`optimizer.step()` keep working for the simple case (full precision, no accumulation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from .errors import ConfigError
from .options import Options, option
from .parallel import is_sharded, set_gradient_sync
from .values import positive_float, positive_int

if TYPE_CHECKING:
    from .engine import Engine

_NOTHING = contextlib.nullcontext()  # reusable: entering it holds no state

Precision = Literal["32", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


@dataclass(frozen=True)
class StepOptions(Options):
    """How optimizer steps are taken; each field is one flag, checked once, here."""

    precision: Precision = option(
        "32", group="training", choices=PRECISIONS,
        help="32: full precision; bf16-mixed / 16-mixed: autocast (16-mixed adds a checkpointed GradScaler); under "
             "fsdp/hsdp parameters are also gathered in 16 bits, gradients reduced in fp32.")
    accumulate_grad_batches: int = option(
        1, group="training", parse=positive_int,
        help="Micro-batches per optimizer step; gradients are all-reduced (ddp) or reduce-scattered (fsdp) only "
             "on the last one (engine.backward/optimizer_step).")
    grad_clip_norm: float | None = option(
        None, group="training", parse=positive_float,
        help="Clip the total gradient norm of each optimizer step to this value.")
    grad_clip_value: float | None = option(
        None, group="training", parse=positive_float, help="Clip every gradient element to [-value, value].")


class GradientStepper:
    """Autocast, loss scaling, accumulation without gradient sync, clipping: one object, state in checkpoints."""

    def __init__(self, options: StepOptions, device: torch.device, modules: list[nn.Module]):
        self.options = options
        self.device = device
        self.ddp_modules = [m for m in modules if isinstance(m, nn.parallel.DistributedDataParallel)]
        self.sharded_modules = [m for m in modules if is_sharded(m)]
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(options.precision)
        self.autocast_dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if options.precision == "16-mixed" else None
        self.boundary = True  # whether the current micro-step ends an accumulation window
        # Full precision without accumulation: every step is a boundary with nothing to enter around it.
        self.plain = dtype is None and options.accumulate_grad_batches == 1

    @property
    def accumulating(self) -> bool:
        return self.options.accumulate_grad_batches > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return _NOTHING
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_step(self, iteration: int, epoch_length: int | None) -> contextlib.AbstractContextManager[Any]:
        """Around one training step: autocast, and no gradient sync (DDP's `no_sync`, FSDP's
        `set_requires_gradient_sync(False)`) unless it ends a window."""
        k = self.options.accumulate_grad_batches
        last_of_epoch = epoch_length is not None and iteration + 1 >= epoch_length
        self.boundary = k == 1 or (iteration + 1) % k == 0 or last_of_epoch
        for m in self.sharded_modules:  # FSDP keeps unsharded gradients until the window's last backward
            set_gradient_sync(m, self.boundary)
        if self.boundary and self.autocast_dtype is None:
            return _NOTHING  # full precision, every step a boundary: no generator, no ExitStack per step
        return self._window()

    @contextlib.contextmanager
    def _window(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.autocast())
            if not self.boundary:  # gradients stay local until the window's last micro-step
                for m in self.ddp_modules:
                    stack.enter_context(m.no_sync())
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`, averaged over the accumulation window and scaled for fp16."""
        if self.accumulating:
            loss = loss / self.options.accumulate_grad_batches
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        with torch.autocast(self.device.type, enabled=False):  # backward runs outside autocast
            loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """At a window boundary: unscale, clip, step, update the scaler, zero grads. True when stepped."""
        if not self.boundary:
            return False
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None and (self.options.grad_clip_norm or self.options.grad_clip_value):
            self.scaler.unscale_(optimizer)
        if self.options.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, self.options.grad_clip_norm)  # no host sync: norm not read
        if self.options.grad_clip_value:
            torch.nn.utils.clip_grad_value_(params, self.options.grad_clip_value)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True


@dataclass
class SchedulerSpec:
    """An LR scheduler the engine steps for you, every optimizer step or every epoch, and checkpoints.

    Put it in `to_save`: `{"scheduler": ig.SchedulerSpec(torch.optim.lr_scheduler.StepLR(opt, 10), "epoch")}`.
    """

    scheduler: Any
    interval: Literal["step", "epoch"] = "epoch"

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ConfigError(f"SchedulerSpec interval must be 'step' or 'epoch', got {self.interval!r}.")

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state))


def supervised_step(model: nn.Module, criterion: Callable[..., torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> Callable[[Engine, Any], dict[str, Any]]:
    """A ready training step for `(inputs, targets)` batches: forward, loss, backward, optimizer step.

    Precision, accumulation and clipping follow the flags through the engine's helpers.
    """

    def step(engine: Engine, batch: Any) -> dict[str, Any]:
        inputs, targets = batch[0], batch[1]
        model.train()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        engine.backward(loss)
        engine.optimizer_step(optimizer)
        return {"loss": loss.detach(), "outputs": outputs.detach(), "targets": targets}

    return step


def supervised_eval_step(model: nn.Module,
                         criterion: Callable[..., torch.Tensor]) -> Callable[[Engine, Any], dict[str, Any]]:
    """A ready evaluation step for `(inputs, targets)` batches: outputs, targets and loss."""

    def step(engine: Engine, batch: Any) -> dict[str, Any]:
        inputs, targets = batch[0], batch[1]
        outputs = model(inputs)
        return {"loss": criterion(outputs, targets), "outputs": outputs, "targets": targets}

    return step
