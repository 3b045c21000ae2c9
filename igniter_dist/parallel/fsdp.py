"""Sharding a model with FSDP2 (`fully_shard`) over the strategy's mesh: units, precision, offload, checkpointing.

Order, as torch recommends: activation checkpointing wraps the units, each unit is compiled, then
`fully_shard` shards them bottom up and the root last, then a meta-device model is materialised
shard by shard.
In one process nothing is sharded: the model only moves to the device (and is materialised), as
`prepare` does for DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ..runtime import Runtime
from ..steps import Precision
from . import Strategy
from .materialize import materialize, on_meta
from .mesh import data_mesh
from .units import sharding_units


@dataclass(frozen=True)
class ShardingOptions:
    """How fsdp and hsdp shard a model (`prepare` checks the values, from its flags)."""

    wrap: tuple[str, ...] = ()  # class names of the sharding units; empty: the default choice
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    precision: Precision = "32"
    compile: bool = False  # each unit, before it is sharded
    init: Callable[[nn.Module], None] | None = None  # initialises a meta-built module's own tensors


def shard(model: nn.Module, rt: Runtime, strategy: Strategy, options: ShardingOptions) -> nn.Module:
    """Collective when distributed: shard `model` in place over the `strategy` mesh; returns it.

    Raises ConfigError, the same on every rank, for a strategy, unit name or layout that cannot work.
    """
    assert strategy in ("fsdp", "hsdp"), f"shard() is for fsdp and hsdp, not {strategy}"
    meta = on_meta(model)
    units = sharding_units(model, options.wrap)
    if options.activation_checkpointing:
        units = checkpoint_units(model, units)
    if options.compile:
        for unit in units:
            unit.compile()  # in place: state dict keys stay those of the plain model
    if not rt.distributed:
        if meta:
            materialize(model, rt, param_device=rt.device, init=options.init)
        return model.to(rt.device)
    mesh = data_mesh(rt, strategy)
    if not meta:
        model.to(rt.device)
        broadcast_from_rank0(model)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=rt.device.type == "cuda") if options.cpu_offload \
        else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mixed_precision(options.precision), offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(options.precision, root=True), offload_policy=offload)
    if meta:
        materialize(model, rt, param_device=torch.device("cpu") if options.cpu_offload else rt.device,
                    init=options.init)
    return model


def mixed_precision(precision: Precision, root: bool = False) -> MixedPrecisionPolicy:
    """FSDP's policy for `--precision`: parameters gathered in 16 bits, gradients reduced in fp32.

    The root hands its outputs back in fp32, so losses and metrics are computed as under autocast.
    """
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if root else None)


def checkpoint_units(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Wrap the outermost units in activation checkpointing in place; returns the units to shard.

    The wrapper's `_checkpoint_wrapped_module.` prefix never reaches a state dict (torch strips it),
    so checkpoints stay interchangeable with runs without checkpointing.
    """
    inner = {id(m) for unit in units for m in unit.modules() if m is not unit}
    wrapped = {id(u): checkpoint_wrapper(u) for u in units if id(u) not in inner}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wrapped:
                parent.register_module(name, wrapped[id(child)])
    return [wrapped.get(id(u), u) for u in units]


def broadcast_from_rank0(model: nn.Module) -> None:
    """Collective: every rank takes rank 0's parameters and buffers, as DDP does when it wraps a model."""
    with torch.no_grad():
        for t in chain(model.parameters(), model.buffers()):
            dist.broadcast(t.detach(), src=0)
