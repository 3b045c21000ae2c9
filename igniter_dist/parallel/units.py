"""Choosing the sharding units: the submodules whose parameters are gathered and freed together.

Default: the repeated blocks (the children of a ModuleList or Sequential that repeat one class,
as a transformer's layers do); a model without any gets every submodule holding at least
`MIN_UNIT_PARAMS` parameters of its own subtree. Class names given by the user replace both.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable

from torch import nn

from ..errors import ConfigError

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
# Below this a unit's all-gather is too small to be worth its own collective.
MIN_UNIT_PARAMS = 1_000_000


def parse_class_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """`Block,Embedding` (or a list of names) as a tuple of class names; an argparse `type=`."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    bad = [n for n in names if n and not n.isidentifier()]
    if bad:
        raise argparse.ArgumentTypeError(f"takes class names separated by commas, got {', '.join(map(repr, bad))}")
    return tuple(n for n in names if n)


def sharding_units(model: nn.Module, wrap: Iterable[str] = (), min_params: int = MIN_UNIT_PARAMS) -> list[nn.Module]:
    """The submodules to shard one by one, children before parents; the root is not among them.

    `wrap` names classes (`type(m).__name__`); ConfigError when a name matches no submodule.
    """
    names = tuple(wrap)
    if names:
        units = _by_class(model, names)
    else:
        units = _repeated_blocks(model) or _by_size(model, min_params)
    position = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units, key=lambda m: -position[id(m)])  # descendants come after ancestors in modules()


def _by_class(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    missing = sorted(set(names) - {type(m).__name__ for m in found})
    if missing:
        have = sorted({type(m).__name__ for m in model.modules() if m is not model and _holds_parameters(m)
                       and not isinstance(m, _CONTAINERS)})
        raise ConfigError(
            f"--fsdp-wrap names {', '.join(missing)} but the model has no submodule of that class; "
            f"its classes with parameters are {', '.join(have) or 'none'}."
        )
    return found


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost children of containers that repeat a class holding parameters."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        children = list(module.children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)):  # not ModuleDict: its entries are named roles
            counts = Counter(type(c) for c in children if _holds_parameters(c))
            repeated = [c for c in children if counts[type(c)] > 1]
            if repeated:
                units.extend(repeated)
                children = [c for c in children if counts[type(c)] <= 1]
        for child in children:
            visit(child)

    visit(model)
    return units


def _by_size(model: nn.Module, min_params: int) -> list[nn.Module]:
    """Bottom up: a submodule whose parameters outside the units below it reach `min_params`."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        free = sum(p.numel() for p in module.parameters(recurse=False))
        free += sum(visit(child) for child in module.children())
        if module is not model and free >= min_params:
            units.append(module)
            return 0
        return free

    visit(model)
    return units


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None
