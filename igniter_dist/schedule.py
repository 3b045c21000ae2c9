"""When things happen in a run: `Every` (a number of epochs or steps) and the engine's `Schedule`."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Every:
    """A schedule: every `n` epochs or every `n` training iterations (`n == 0` means never)."""

    n: int
    unit: Literal["epochs", "steps"] = "epochs"

    def due(self, step: int, epoch: int, epoch_ended: bool) -> bool:
        """Pure predicate: is the scheduled thing due after this step (or this epoch's end)?"""
        if self.n <= 0:
            return False
        if self.unit == "steps":
            return step % self.n == 0
        return epoch_ended and epoch % self.n == 0

    def __str__(self) -> str:
        return f"{self.n}{self.unit}"


_EVERY = re.compile(r"^\s*(\d+)\s*(e|ep|epoch|epochs|s|step|steps|it|iter|iters|iteration|iterations)?\s*$")


def parse_every(value: str | int | Every) -> Every:
    """Parse `2`, `2epochs` (epochs) or `500steps` / `500it` (training iterations); `0` is never."""
    if isinstance(value, Every):
        return value
    m = _EVERY.match(str(value).lower())
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected a count of epochs or steps such as 1, 2epochs or 500steps, got {value!r}"
        )
    unit = m.group(2) or "epochs"
    return Every(int(m.group(1)), "epochs" if unit.startswith("e") else "steps")


@dataclass(frozen=True)
class Schedule:
    """What the loop does when: how long to train, and when to log, evaluate and save.

    Training ends at `max_epochs` epochs or `max_steps` optimizer steps, whichever comes first;
    None means no limit of that kind (at least one is set).
    """

    max_epochs: int | None = 1
    max_steps: int | None = None
    log_every: int = 50
    eval_every: Every = field(default_factory=lambda: Every(1))
    save_every: Every = field(default_factory=lambda: Every(1))
    save_every_minutes: float | None = None

    def done(self, epoch: int, optimizer_step: int) -> bool:
        """Pure predicate: has a run that completed `epoch` epochs and `optimizer_step` steps finished?"""
        return ((self.max_epochs is not None and epoch >= self.max_epochs)
                or (self.max_steps is not None and optimizer_step >= self.max_steps))
