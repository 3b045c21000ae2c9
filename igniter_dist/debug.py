"""`--debug true`: a fast end-to-end check of a script before a long run.

Two epochs of a few batches, a checkpoint saved and loaded back, anomaly detection, a check that
every rank holds the same parameters after the first steps, and summaries of model and data.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import IgniterError
from .parallel import is_dtensor
from .runtime import Runtime
from .wrapping import unwrap

if TYPE_CHECKING:
    from .engine import Engine, Loop

TRAIN_BATCHES = 4
EVAL_BATCHES = 2
EPOCHS = 2


class ReplicaDivergence(IgniterError):
    """Ranks hold different parameters: something changed one replica outside DDP."""


def tensor_digests(to_save: Mapping[str, Any], shards: bool = True) -> dict[str, str]:
    """A digest of every parameter and buffer of the modules in `to_save`, by qualified name.

    A sharded tensor's digest is of this rank's shard; `shards=False` leaves them out (ranks differ there)."""
    out: dict[str, str] = {}
    for key, obj in to_save.items():
        if isinstance(obj, nn.Module):
            for name, t in unwrap(obj).state_dict().items():
                if isinstance(t, torch.Tensor) and is_dtensor(t):
                    if not shards:
                        continue
                    t = t.to_local()
                if isinstance(t, torch.Tensor):
                    out[f"{key}.{name}"] = hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def summaries(rt: Runtime, to_save: Mapping[str, Any], train: Loop, evaluators: Mapping[str, Loop]) -> str:
    lines = []
    for key, obj in to_save.items():
        if isinstance(obj, nn.Module):
            params = list(unwrap(obj).parameters())
            total = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            size = sum(p.numel() * p.element_size() for p in params) / 2**20
            lines.append(f"model {key}: {type(unwrap(obj)).__name__}, {total:,} parameters "
                         f"({trainable:,} trainable), {size:.2f} MiB, on {rt.device}")
    lines.append(f"data: world size {rt.world_size}; train {_batches(train)} batches per epoch per rank")
    for name, loop in evaluators.items():
        lines.append(f"data: {name} {_batches(loop)} batches per rank")
    return "\n".join("igniter-dist debug: " + line for line in lines)


def _batches(loop: Loop) -> str:
    try:
        n = len(loop.loader)
    except TypeError:
        return "?"
    limit = loop.epoch_length if loop.epoch_length is not None else loop.max_batches
    return f"{min(n, limit)} of {n}" if limit is not None else str(n)


class DebugChecks:
    """Checks the engine runs in debug mode: replica agreement after the first steps, a checkpoint round trip."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.round_tripped = False

    def after_step(self, engine: Engine) -> None:
        """Collective at steps 1 and 2: all ranks compare parameter digests."""
        if engine.state.step > 2 or not self.runtime.distributed:
            return
        mine = tensor_digests(engine.to_save, shards=False)
        everyone = self.runtime.all_gather_object(mine)
        diverged = [name for name in mine if any(other.get(name) != mine[name] for other in everyone)]
        if diverged:
            shown = ", ".join(diverged[:5]) + (f" and {len(diverged) - 5} more" if len(diverged) > 5 else "")
            raise ReplicaDivergence(
                f"After step {engine.state.step} the ranks hold different values of {shown}; something changed "
                "one replica outside DDP (rank-dependent code in the step, or a model not wrapped with ig.prepare)."
            )
        if mine:
            self._say(f"step {engine.state.step}: parameters agree on all {self.runtime.world_size} ranks")
        else:
            self._say(f"step {engine.state.step}: every parameter is sharded, so there are no replicas to compare")

    def after_save(self, engine: Engine) -> None:
        """Collective, once: load the checkpoint just saved and check nothing changed."""
        checkpoints = engine.checkpoints
        if self.round_tripped or checkpoints is None:
            return
        self.round_tripped = True
        before = tensor_digests(engine.to_save)
        start = time.perf_counter()
        checkpoints.wait()
        checkpoints.load(engine.state.step, engine.checkpoint_state())
        changed = [k for k, v in tensor_digests(engine.to_save).items() if before.get(k) != v]
        if changed:
            raise IgniterError(f"Checkpoint round trip changed {', '.join(changed[:5])}; please report this bug.")
        self._say(f"checkpoint round trip ok: step {engine.state.step} saved and loaded back from "
                  f"{checkpoints.url_of(engine.state.step)} in {time.perf_counter() - start:.2f} s")

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"igniter-dist debug: {message}", file=sys.stderr, flush=True)
