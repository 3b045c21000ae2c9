"""How `ig.prepare` readies a model for this job: on the rank's device, wrapped by the strategy, compiled.

`igniter_main` sets the `PrepareOptions` once from the flags; arguments a script passes to
`prepare` win over them. A strategy is one function `(model, runtime, options) -> model`, so the
loop, metrics and checkpoints never branch on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from .options import Options, option
from .runtime import Runtime, runtime
from .values import parse_bool


@dataclass(frozen=True)
class PrepareOptions(Options):
    """How `prepare` wraps models when the script does not say."""

    find_unused_parameters: bool = option(
        False, group="distributed", parse=parse_bool,
        help="Let DDP handle parameters that get no gradient in a step (slower).")
    sync_batchnorm: bool = option(
        False, group="distributed", parse=parse_bool,
        help="Convert BatchNorm layers to SyncBatchNorm when distributed.")
    compile: bool = option(False, group="training", parse=parse_bool, help="torch.compile the model in ig.prepare.")


_options = PrepareOptions()


def configure(options: PrepareOptions) -> None:
    """Set the options `prepare` follows when a script's call leaves them unset (`igniter_main`: the flags)."""
    global _options
    _options = options


def prepare(
    model: nn.Module,
    find_unused_parameters: bool | None = None,
    sync_batchnorm: bool | None = None,
    compile: bool | None = None,
) -> nn.Module:
    """Move `model` to this rank's device, wrap it in DDP when world_size > 1, optionally compile it.

    Options left as None follow the flags `--find-unused-parameters`, `--sync-batchnorm` and
    `--compile`.
    """
    given = {"find_unused_parameters": find_unused_parameters, "sync_batchnorm": sync_batchnorm, "compile": compile}
    options = replace(_options, **{k: v for k, v in given.items() if v is not None})
    rt = runtime()
    if options.sync_batchnorm and rt.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = wrap_ddp(model, rt, options)
    if options.compile:
        # For a module torch.compile returns an OptimizedModule (an nn.Module); its stub says Callable.
        model = cast(nn.Module, torch.compile(model))
    return model


def wrap_ddp(model: nn.Module, rt: Runtime, options: PrepareOptions) -> nn.Module:
    """The ddp strategy: the model on the rank's device, in DistributedDataParallel when world_size > 1."""
    model = model.to(rt.device)
    if not rt.distributed:
        return model
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=options.find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP (or torch.compile) wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
