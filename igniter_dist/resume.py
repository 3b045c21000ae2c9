"""The seam between the engine and checkpoints: what a checkpoint of a run holds, and `RunCheckpoints`,
which saves and restores it through the checkpoint manager.

What goes where: the user's `to_save` objects, the engine's counters and the loss scaler are shared
state; this rank's RNG streams and training metric accumulators differ by rank and go under
rank-unique keys; arguments, the tracking run id and versions go in the manifest that commits
the checkpoint. Everything reaches the manager through `state_dict()`/`load_state_dict()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .metrics import MetricSet
from .rng import get_rng_state, seed_everything, set_rng_state
from .runtime import Runtime

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager, LoadResult


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunState:
    """The objects a checkpoint of a run saves, and loads back in place."""

    shared: dict[str, Any]  # the same on every rank: to_save's objects, "engine", "grad_scaler"
    per_rank: Stateful  # this rank's own


class RankState:
    """This rank's own resumable state: its RNG streams and the training metrics' partial sums."""

    def __init__(self, train_metrics: MetricSet):
        self.train_metrics = train_metrics

    def state_dict(self) -> dict[str, Any]:
        return {"rng": get_rng_state(), "train_metrics": self.train_metrics.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(state["rng"])
        self.train_metrics.load_state_dict(state["train_metrics"])


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumed from."""

    step: int
    url: str
    saved_world_size: int
    tracking_run_id: str | None


class Checkpoints(Protocol):
    """What a run needs of its checkpoints; every method is a collective except `url_of`."""

    def save(self, step: int, state: RunState, *, manifest: dict[str, Any], metrics: dict[str, float]) -> bool:
        """Save `state` as step `step`; True once committed (async: once started)."""
        ...

    def load(self, step: int, state: RunState) -> None:
        """Load committed step `step` into `state`'s objects."""
        ...

    def resume(self, state: RunState) -> Resumed | None:
        """Load the newest intact committed step into `state`'s objects; None when there is none."""
        ...

    def wait(self) -> None:
        """Wait for the save in flight."""
        ...

    @property
    def url(self) -> str:
        """The folder or URL that holds the run's checkpoints."""
        ...

    def url_of(self, step: int) -> str: ...

    def close(self) -> None: ...


class RunCheckpoints:
    """`Checkpoints` over a `CheckpointManager`, with the run-level manifest entries (arguments, run id)."""

    def __init__(self, manager: CheckpointManager, runtime: Runtime, *, seed: int, manifest: dict[str, Any]):
        self.manager = manager
        self.runtime = runtime
        self.seed = seed
        self.manifest = manifest  # run-level extras: redacted args, run id

    def save(self, step: int, state: RunState, *, manifest: dict[str, Any], metrics: dict[str, float]) -> bool:
        """Collective: save `state` as step `step` on every rank; True once committed."""
        return self.manager.save(step, state.shared, per_rank=state.per_rank.state_dict(),
                                 manifest={**self.manifest, **manifest}, metrics=metrics)

    def load(self, step: int, state: RunState) -> None:
        """Collective: load committed step `step` into `state`'s objects."""
        self._apply_per_rank(self.manager.load(step, state.shared), state)

    def resume(self, state: RunState) -> Resumed | None:
        """Collective: load the newest intact committed checkpoint into `state`'s objects; None if there is none."""
        result = self.manager.load_latest(state.shared)  # passes over damaged steps, saying so
        if result is None:
            return None
        self._apply_per_rank(result, state)
        run_id = result.manifest.get("tracking_run_id")
        if run_id:
            self.manifest["tracking_run_id"] = run_id
        return Resumed(step=result.step, url=result.url, saved_world_size=result.saved_world_size,
                       tracking_run_id=run_id)

    def _apply_per_rank(self, result: LoadResult, state: RunState) -> None:
        if result.per_rank is not None:
            state.per_rank.load_state_dict(result.per_rank)
        else:  # a rank the saving run did not have: a fresh, reproducible stream
            seed_everything(self.seed + self.runtime.rank + 7919 * result.step)

    def wait(self) -> None:
        self.manager.wait()

    @property
    def url(self) -> str:
        return self.manager.url

    def url_of(self, step: int) -> str:
        return self.manager.url_of(step)

    def close(self) -> None:
        self.manager.close()
