"""How `ig.prepare` readies a model for this job: on the rank's device, wrapped by the strategy, compiled.

`igniter_main` sets the `PrepareOptions` once from the flags; arguments a script passes to
`prepare` win over them. A strategy is one function `(model, runtime, options) -> model`, so the
loop, metrics and checkpoints never branch on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from .options import Options, option
from .parallel import STRATEGIES, Strategy, is_dtensor, unwrap_chain
from .parallel.units import parse_class_names
from .runtime import Runtime, runtime
from .steps import PRECISIONS, Precision
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
    compile: bool = option(False, group="training", parse=parse_bool,
                           help="torch.compile the model in ig.prepare (under fsdp/hsdp: each sharding unit).")
    strategy: Strategy = option(
        "ddp", group="distributed", choices=STRATEGIES,
        help="ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded over "
             "all ranks (FSDP2); hsdp: sharded within a node, replicated across nodes.")
    fsdp_wrap: tuple[str, ...] = option(
        (), group="distributed", parse=parse_class_names,
        help="fsdp/hsdp: class names of the sharding units, comma-separated (default: the repeated blocks).")
    activation_checkpointing: bool = option(
        False, group="training", parse=parse_bool,
        help="fsdp/hsdp: recompute each sharding unit's activations in the backward instead of keeping them.")
    fsdp_cpu_offload: bool = option(
        False, group="distributed", parse=parse_bool,
        help="fsdp/hsdp: keep the shards, their gradients and the optimizer step on the CPU.")
    precision: Precision = option(
        "32", group=None, choices=PRECISIONS,
        help="fsdp/hsdp: the dtype parameters are gathered in; igniter_main passes --precision.")
    init: Callable[[nn.Module], None] | None = option(
        None, group=None,
        help="For a model built on the meta device: init(module) initialises the module's own tensors "
             "(default: its reset_parameters()).")


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
    *,
    strategy: Strategy | None = None,
    fsdp_wrap: Iterable[str] | None = None,
    activation_checkpointing: bool | None = None,
    fsdp_cpu_offload: bool | None = None,
    precision: Precision | None = None,
    init: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Collective when distributed: ready `model` for this job by `--strategy`, optionally compile it.

    ddp moves it to this rank's device and wraps it in DDP when world_size > 1; fsdp and hsdp shard
    it with FSDP2 (see `igniter_dist.parallel.fsdp`). A model built on the meta device is
    materialised (already sharded under fsdp/hsdp) with each module's `reset_parameters()` or
    `init(module)`. Options left as None follow the flags of the same names.
    """
    given: dict[str, Any] = {
        "find_unused_parameters": find_unused_parameters, "sync_batchnorm": sync_batchnorm, "compile": compile,
        "strategy": strategy, "fsdp_wrap": fsdp_wrap, "activation_checkpointing": activation_checkpointing,
        "fsdp_cpu_offload": fsdp_cpu_offload, "precision": precision, "init": init}
    options = replace(_options, **{k: v for k, v in given.items() if v is not None})
    rt = runtime()
    if options.sync_batchnorm and rt.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if options.strategy != "ddp":
        return wrap_sharded(model, rt, options)
    model = wrap_ddp(model, rt, options)
    if options.compile:
        # For a module torch.compile returns an OptimizedModule (an nn.Module); its stub says Callable.
        model = cast(nn.Module, torch.compile(model))
    return model


def wrap_ddp(model: nn.Module, rt: Runtime, options: PrepareOptions) -> nn.Module:
    """The ddp strategy: the model on the rank's device, in DistributedDataParallel when world_size > 1."""
    from .parallel.materialize import materialize, on_meta

    if on_meta(model):
        materialize(model, rt, param_device=rt.device, init=options.init)  # DDP then broadcasts rank 0's copy
    model = model.to(rt.device)
    if not rt.distributed:
        return model
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=options.find_unused_parameters)


def wrap_sharded(model: nn.Module, rt: Runtime, options: PrepareOptions) -> nn.Module:
    """The fsdp and hsdp strategies: FSDP2 over the strategy's mesh (the plain model in one process)."""
    from .parallel.fsdp import ShardingOptions, shard

    return shard(model, rt, options.strategy, ShardingOptions(
        wrap=options.fsdp_wrap, activation_checkpointing=options.activation_checkpointing,
        cpu_offload=options.fsdp_cpu_offload, precision=options.precision, compile=options.compile,
        init=options.init))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP (or torch.compile) wrapper."""
    return unwrap_chain(model)[-1]


def sync_buffers(modules: Iterable[nn.Module], rt: Runtime) -> None:
    """Collective: every rank takes rank 0's buffers of `modules`, the copy DDP broadcasts at the next forward.

    BatchNorm's running statistics drift apart between ranks (each updates them from its own batch);
    checkpoints and evaluation use this copy, so a resumed run and the evaluated model are the ones
    training continues with and the one exported. One broadcast per dtype; nothing on one process.
    """
    if not rt.distributed:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for module in modules:
        for buffer in replicated_buffers(module):
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():  # the same modules on every rank: the same groups, in the same order
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                b.copy_(part.view_as(b))


def replicated_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers of `model` meant to be equal on every rank, by wrapper type.

    DDP: those it broadcasts (none with `broadcast_buffers=False`, not its ignored ones). Any other
    module, all of them but DTensors: FSDP2 shards parameters only, so its buffers are per-rank
    copies like a plain module's, and a DTensor buffer is already one tensor over the mesh.
    """
    ddp = next((m for m in unwrap_chain(model) if isinstance(m, nn.parallel.DistributedDataParallel)), None)
    if ddp is not None:
        if not ddp.broadcast_buffers:
            return []
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        return [b for name, b in unwrap(model).named_buffers() if name not in ignored]
    return [b for b in unwrap(model).buffers() if not is_dtensor(b)]
