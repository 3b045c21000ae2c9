"""Save and restore a whole training run through the checkpoint manager.

What goes where: the user's `to_save` objects and the engine's counters are replicated state;
RNG states and metric accumulators differ by rank and go under rank-unique keys; arguments,
the tracking run id and versions go in the manifest that commits the checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .rng import get_rng_state, seed_everything, set_rng_state
from .runtime import Runtime

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager
    from .engine import Engine


class RunCheckpoints:
    """The engine's view of checkpoints: `save(engine)` and `resume(engine)`, both collective."""

    def __init__(self, manager: CheckpointManager, runtime: Runtime, to_save: Mapping[str, Any],
                 manifest: dict[str, Any]):
        self.manager = manager
        self.runtime = runtime
        self.to_save = dict(to_save)
        self.manifest = manifest  # run-level extras: redacted args, run id

    def state(self, engine: Engine) -> dict[str, Any]:
        """Everything saved and loaded for `engine`: `to_save`, the engine, the loss scaler."""
        state = {**self.to_save, "engine": engine}
        if engine.stepper.scaler is not None:  # 16-mixed: the loss scale must survive a resume
            state["grad_scaler"] = engine.stepper.scaler
        return state

    def save(self, engine: Engine) -> bool:
        """Collective: save the engine's current step on every rank; True once committed."""
        per_rank = {"rng": get_rng_state(), "train_metrics": engine.train_loop.metrics.state_dict()}
        manifest = {**self.manifest, "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        if engine.sinks.run_id:
            manifest["tracking_run_id"] = engine.sinks.run_id
        committed = self.manager.save(engine.state.step, self.state(engine), per_rank=per_rank,
                                      manifest=manifest, metrics=dict(engine.metrics))
        if committed:
            engine.sinks.set_tag("checkpoint", self.manager.url_of(engine.state.step))
            engine.sinks.flush()
        return committed

    def resume(self, engine: Engine, seed: int) -> bool:
        """Collective: load the latest committed checkpoint into the run; False when there is none."""
        result = self.manager.load_latest(self.state(engine))  # passes over damaged steps, saying so
        if result is None:
            return False
        if result.per_rank is not None:
            set_rng_state(result.per_rank["rng"])
            engine.train_loop.metrics.load_state_dict(result.per_rank["train_metrics"])
        else:  # a rank the saving run did not have: a fresh, reproducible stream
            seed_everything(seed + self.runtime.rank + 7919 * result.step)
        run_id = result.manifest.get("tracking_run_id")
        if run_id:
            self.manifest["tracking_run_id"] = run_id
        if self.runtime.is_main:
            world = "" if result.saved_world_size == self.runtime.world_size else (
                f", resharded from {result.saved_world_size} to {self.runtime.world_size} ranks")
            print(f"igniter-dist: resumed from {result.url} (step {engine.state.step}, epoch "
                  f"{engine.state.epoch + 1}, iteration {engine.state.iteration}{world})", file=sys.stderr, flush=True)
        return True
