"""What a training step needs to be correct under DDP and FSDP: precision, accumulation, clipping.

The engine owns one `GradientStepper`; user steps reach it through `engine.backward(loss)`,
`engine.optimizer_step(optimizer)` and `engine.autocast()`. While training runs, the optimizers in
`to_save` also reach it through their own `step()`, so a plain `loss.backward(); optimizer.step()`
honours accumulation and clipping too; fp16 loss scaling needs `engine.backward`, and a step that
cannot be made correct is refused with one sentence.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import ConfigError
from .options import Options, option
from .parallel import is_sharded, set_gradient_sync, unwrap_chain
from .runtime import Runtime
from .values import positive_float, positive_int

if TYPE_CHECKING:
    from .engine import Engine

_NOTHING = contextlib.nullcontext()  # reusable: entering it holds no state

Precision = Literal["32", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
HELPERS_DOC = "docs/howto/precision.md"


@dataclass(frozen=True)
class StepOptions(Options):
    """How optimizer steps are taken; each field is one flag, checked once, here."""

    precision: Precision = option(
        "32", group="training", choices=PRECISIONS,
        help="32: full precision; bf16-mixed / 16-mixed: autocast (16-mixed adds a checkpointed GradScaler and needs "
             "engine.backward(loss) in the train step); under fsdp/hsdp parameters are also gathered in 16 bits, "
             "gradients reduced in fp32.")
    accumulate_grad_batches: int = option(
        1, group="training", parse=positive_int,
        help="Micro-batches per optimizer step; gradients are all-reduced (ddp) or reduce-scattered (fsdp) only "
             "on the last one. Works with a plain loss.backward(); optimizer.step() (the to_save optimizers step "
             "and zero only at a window's end).")
    grad_clip_norm: float | None = option(
        None, group="training", parse=positive_float,
        help="Clip the total gradient norm of each optimizer step (of the to_save optimizers) to this value.")
    grad_clip_value: float | None = option(
        None, group="training", parse=positive_float,
        help="Clip every gradient element to [-value, value] before each optimizer step.")


class GradientStepper:
    """Autocast, loss scaling, accumulation without gradient sync, clipping: one object, state in checkpoints.

    `engine.optimizer_step(optimizer)` and, while `attached`, a to_save optimizer's own `step()` take
    the same path (`_step`): unscale, clip, step and zero only at the end of an accumulation window.
    """

    def __init__(self, options: StepOptions, runtime: Runtime, modules: Sequence[nn.Module] = (),
                 optimizers: Sequence[torch.optim.Optimizer] = ()):
        self.options = options
        self.runtime = runtime
        self.device = runtime.device
        self.modules = list(modules)
        self.optimizers = list(optimizers)
        self.ddp_modules = [m for m in modules if isinstance(m, nn.parallel.DistributedDataParallel)]
        self.sharded_modules = [m for m in modules if is_sharded(m)]
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(options.precision)
        self.autocast_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if options.precision == "16-mixed" else None
        self.boundary = True  # whether the current micro-step ends an accumulation window
        # Full precision without accumulation: every step is a boundary with nothing to enter around it.
        self.plain = dtype is None and options.accumulate_grad_batches == 1
        self.refusal: str | None = None  # why a step was refused, until the ranks agree on it
        self._scaled = False  # engine.backward ran in this micro-step (16-mixed needs it)
        self._window_averaged = False  # engine.backward ran in this window: its loss was divided by k
        self._inner = False  # inside _step: the wrappers let the real step / zero_grad through
        self._agreed = True  # no refusal left to agree on (set False while attached, until the first step)

    @property
    def accumulating(self) -> bool:
        return self.options.accumulate_grad_batches > 1

    @property
    def intercepts(self) -> bool:
        """Whether a plain step needs the optimizers routed through this stepper (any flag beyond the default)."""
        o = self.options
        return self.accumulating or bool(o.grad_clip_norm or o.grad_clip_value) or self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return _NOTHING
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_step(self, iteration: int, epoch_length: int | None) -> contextlib.AbstractContextManager[Any]:
        """Around one training step: autocast, and no gradient sync (DDP's `no_sync`, FSDP's
        `set_requires_gradient_sync(False)`) unless it ends a window.

        Collective after the first step of an attached run: the ranks agree on any refused step.
        """
        k = self.options.accumulate_grad_batches
        if self.boundary:  # the previous micro-step closed a window
            self._window_averaged = False
        self._scaled = False
        last_of_epoch = epoch_length is not None and iteration + 1 >= epoch_length
        self.boundary = k == 1 or (iteration + 1) % k == 0 or last_of_epoch
        for m in self.sharded_modules:  # FSDP keeps unsharded gradients until the window's last backward
            set_gradient_sync(m, self.boundary)
        if self.boundary and self.autocast_dtype is None and self._agreed:
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
        if not self._agreed:
            self._agree()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`, averaged over the accumulation window and scaled for fp16."""
        self._scaled = self._window_averaged = True
        if self.accumulating:
            loss = loss / self.options.accumulate_grad_batches
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        with torch.autocast(self.device.type, enabled=False):  # backward runs outside autocast
            loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """At a window boundary: unscale, clip, step, update the scaler, zero grads. True when stepped."""
        return self._step(optimizer, zero=True)

    def _step(self, optimizer: torch.optim.Optimizer, *, zero: bool) -> bool:
        if self.scaler is not None and not self._scaled:
            return self._refuse(
                f"--precision 16-mixed needs the loss scaled by engine.backward(loss), but the train step reached "
                f"{type(optimizer).__name__}.step() after a plain loss.backward(); use engine.backward(loss) and "
                f"engine.optimizer_step(optimizer) in your train step, as in {HELPERS_DOC}.")
        if not self.boundary or self.refusal is not None:
            return False
        k = self.options.accumulate_grad_batches
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._inner = True
        try:
            if k > 1 and not self._window_averaged:  # plain loss.backward(): average the window as engine.backward does
                torch._foreach_mul_([p.grad for p in params], 1.0 / k)
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
            if zero:
                optimizer.zero_grad(set_to_none=True)
        finally:
            self._inner = False
        return True

    # ---------------------------------------------------------------- the user's plain step

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """While training runs, route the to_save optimizers' own `step`/`zero_grad` through `_step`.

        Only when a flag needs it. Accumulating, `zero_grad` of those optimizers and of the modules
        in to_save (wrapper and inner module) is left to the window's end, and every window starts
        from zero gradients. The wrappers are instance attributes, removed afterwards.
        """
        if not self.intercepts:
            yield
            return

        undo: list[Callable[[], None]] = []
        plain = self.plain
        hook = register_optimizer_step_pre_hook(self._foreign_step)
        try:
            for opt in self.optimizers:
                if self.accumulating:
                    opt.zero_grad(set_to_none=True)  # the first window starts clean, as every later one
                undo.append(_replace(opt, "step", self._wrapped_step(opt)))
            if self.accumulating:
                modules = {id(m): m for top in self.modules for m in unwrap_chain(top)}.values()
                zeroing: list[torch.optim.Optimizer | nn.Module] = [*self.optimizers, *modules]
                for obj in zeroing:
                    undo.append(_replace(obj, "zero_grad", self._kept_zero_grad(obj.zero_grad)))
            self._agreed = False
            self.plain = False  # the engine enters micro_step, which agrees after the first step
            yield
        finally:
            hook.remove()
            for restore in reversed(undo):
                restore()
            self._agreed = True
            self.plain = plain

    @contextlib.contextmanager
    def engine_calls(self) -> Iterator[None]:
        """The engine's own calls reach the optimizers' real `step` and `zero_grad`.

        DCP steps an optimizer without state (plain SGD) with zero gradients and lr 0 to build one when
        it saves or loads it; that is no training step, so it must not clip, count or move the loss scaler.
        """
        inner, self._inner = self._inner, True
        try:
            yield
        finally:
            self._inner = inner

    def _wrapped_step(self, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        real = optimizer.step

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if self._inner:  # the engine's own step, or GradScaler's call inside it
                return real(*args, **kwargs)
            closure = args[0] if args else kwargs.get("closure")
            if closure is not None:
                return self._refuse(
                    f"{self._flags()} cannot reach gradients that {type(opt).__name__}.step(closure) computes inside "
                    "the step; call loss.backward() and optimizer.step() without a closure.")
            self._step(opt, zero=self.accumulating)
            return None

        if hasattr(real, "_wrapped_by_lr_sched"):  # an LR scheduler's step counter is inside `real`; keep its mark
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # the attribute torch's LRScheduler reads
        # A bound method, as LRScheduler expects of optimizer.step (it reads __func__).
        return types.MethodType(step, optimizer)

    def _kept_zero_grad(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def zero_grad(*args: Any, **kwargs: Any) -> None:
            if self._inner:  # the window's end
                real(*args, **kwargs)

        return zero_grad

    def _foreign_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Global pre-hook: an optimizer stepped that is neither in to_save nor stepped by the engine."""
        if not self._inner:
            self._refuse(
                f"The train step stepped a {type(optimizer).__name__} that is not in to_save, so {self._flags()} "
                "cannot apply to it; add it to to_save (then it is checkpointed too) or step it with "
                "engine.optimizer_step(optimizer).")

    def _flags(self) -> str:
        o = self.options
        flags = [f"--accumulate-grad-batches {o.accumulate_grad_batches}"] if self.accumulating else []
        flags += [f"--grad-clip-norm {o.grad_clip_norm}"] if o.grad_clip_norm else []
        flags += [f"--grad-clip-value {o.grad_clip_value}"] if o.grad_clip_value else []
        flags += ["--precision 16-mixed"] if self.scaler is not None else []
        return " and ".join(flags)

    def _refuse(self, message: str) -> bool:
        """No optimizer step; the ranks stop together after the first step (later, this rank stops at once)."""
        if self._agreed:
            raise ConfigError(message)
        self.refusal = self.refusal or message
        return False

    def _agree(self) -> None:
        """Collective: every rank learns whether any refused a step in the run's first step, and stops if so."""
        self._agreed = True
        refusals = [r for r in self.runtime.all_gather_object(self.refusal) if r]
        if refusals:
            raise ConfigError(refusals[0])


def _replace(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set an instance attribute; returns how to give `obj` back exactly as it was."""
    had, previous = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)

    def restore() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return restore


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
