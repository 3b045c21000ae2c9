"""The implementations under test, by name; peers are imported only when their run starts."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from workloads import RunContext

# name -> (module, function, the package it needs)
IMPLS: dict[str, tuple[str, str, str | None]] = {
    "raw": ("raw", "run", None),
    "igniter": ("igniter", "run", "igniter_dist"),
    "igniter+ckpt": ("igniter", "run_with_checkpoints", "igniter_dist"),
    "fabric": ("fabric_loop", "run", "lightning"),
    "trainer": ("lightning_trainer", "run", "lightning"),
    "ignite": ("ignite_engine", "run", "ignite"),
    "accelerate": ("accelerate_loop", "run", "accelerate"),
}


def runner(name: str) -> Callable[[RunContext], None]:
    module, function, _ = IMPLS[name]
    return getattr(importlib.import_module(f"impls.{module}"), function)


def available(name: str) -> bool:
    package = IMPLS[name][2]
    return package is None or importlib.util.find_spec(package) is not None
