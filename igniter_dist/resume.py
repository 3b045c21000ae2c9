"""The seam between the engine and checkpoints: what a checkpoint of a run holds, and `RunCheckpoints`,
which saves and restores it through the checkpoint manager.

What goes where: the user's `to_save` objects, the engine's counters and the loss scaler are shared
state; this rank's RNG streams, training metric accumulators and training stream position differ
by rank and go under rank-unique keys; arguments, the tracking run id and versions go in the manifest that commits
the checkpoint. Everything reaches the manager through `state_dict()`/`load_state_dict()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import CheckpointError, ConfigError
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
    """This rank's own resumable state: its RNG streams, the training metrics' partial sums and, for a
    training stream, its position (see streams.Stream)."""

    def __init__(self, train_metrics: MetricSet, stream: Stateful | None = None):
        self.train_metrics = train_metrics
        self.stream = stream

    def state_dict(self) -> dict[str, Any]:
        state = {"rng": get_rng_state(), "train_metrics": self.train_metrics.state_dict()}
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(state["rng"])
        self.train_metrics.load_state_dict(state["train_metrics"])
        if self.stream is not None and "stream" in state:  # checkpoints before streams kept no position
            self.stream.load_state_dict(state["stream"])


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumed from."""

    step: int
    url: str
    saved_world_size: int
    tracking_run_id: str | None
    saved_args: dict[str, Any] = field(default_factory=dict)  # the redacted arguments its manifest recorded


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
        _apply_per_rank(self.manager.load(step, state.shared), state, self.runtime, self.seed)

    def resume(self, state: RunState) -> Resumed | None:
        """Collective: load the newest intact committed checkpoint into `state`'s objects; None if there is none."""
        result = self.manager.load_latest(state.shared)  # passes over damaged steps, saying so
        if result is None:
            return None
        _apply_per_rank(result, state, self.runtime, self.seed)
        run_id = result.manifest.get("tracking_run_id")
        if run_id:
            self.manifest["tracking_run_id"] = run_id
        return _resumed(result, run_id)

    def wait(self) -> None:
        self.manager.wait()

    @property
    def url(self) -> str:
        return self.manager.url

    def url_of(self, step: int) -> str:
        return self.manager.url_of(step)

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------- --resume-from and --init-from


def resume_from(url: str, state: RunState, runtime: Runtime, seed: int) -> Resumed:
    """Collective: load committed step folder `url` (of this run or another, local or remote) into `state`.

    The run continues at that step exactly, as after a restart, but as a new tracking run: the
    checkpoint's own run is left as it ended. CheckpointError when `url` is not a committed step
    folder or does not match `state`.
    """
    from .checkpoint import CheckpointManager

    root, step = _step_folder("--resume-from", url, runtime, also="")
    with CheckpointManager(root, runtime) as manager:
        result = manager.load(step, state.shared)
    _apply_per_rank(result, state, runtime, seed)
    return _resumed(result, None)


def init_from(path: str, to_save: Mapping[str, Any], runtime: Runtime) -> str:
    """Collective: load model weights only, for a fresh run; returns what was loaded, to say so.

    `path` is a committed step folder (every module of `to_save` is loaded from its entry of the
    same name; DCP reads those keys alone), or a `model.pt` / `model.safetensors` file (loaded into
    the first module of `to_save`, the one `ig.train` exports). CheckpointError when it cannot be
    read or does not match.
    """
    from torch import nn

    models = {name: obj for name, obj in to_save.items() if isinstance(obj, nn.Module)}
    if not models:
        raise ConfigError("--init-from loads model weights, but to_save holds no nn.Module; add the model to it.")
    if path.rstrip("/").endswith(MODEL_FILES):
        name, model = next(iter(models.items()))
        _load_model_file(path, name, model, runtime)
        return f"the weights of {name!r} from {path}"
    from .checkpoint import CheckpointManager

    root, step = _step_folder("--init-from", path, runtime, also=", a model.pt or a model.safetensors")
    with CheckpointManager(root, runtime) as manager:
        result = manager.load(step, dict(models), rank_state=False)
    return f"the weights of {', '.join(repr(n) for n in models)} from {result.url}"


MODEL_FILES = (".pt", ".pth", ".safetensors")


def _step_folder(flag: str, url: str, runtime: Runtime, *, also: str) -> tuple[str, int]:
    """Collective: the root and step of committed step folder `url`, seen by every rank; CheckpointError if not."""
    from .checkpoint.agreement import agree
    from .checkpoint.layout import MANIFEST, split_step_url
    from .checkpoint.storage import Storage

    found = split_step_url(url)
    if found is None:
        raise CheckpointError(f"{flag} {url} is not a checkpoint step folder; pass one such as "
                              f"<checkpoint-dir>/step_0000000270{also}.")
    storage = Storage(url)  # only parses the URL: the same on every rank
    error: CheckpointError | None = None
    try:
        if not storage.exists():
            where = (f" on rank {runtime.rank}'s machine; every rank reads its share of the checkpoint, so put it "
                     "where all of them can reach it (a shared folder or s3://)") if runtime.rank else ""
            error = CheckpointError(f"{flag} {url} does not exist{where}.")
        elif not storage.exists(MANIFEST):
            error = CheckpointError(f"{flag} {url} is not a committed checkpoint: it has no {MANIFEST} (an "
                                    "interrupted save, or not a checkpoint).")
    except Exception as e:
        error = storage.error("read", e)
    agree(runtime.all_gather_object, error)  # every rank reads its share: every rank must see the folder
    return found


def _load_model_file(path: str, name: str, model: Any, runtime: Runtime) -> None:
    """Collective: every rank reads `path` and loads it into `model` (sharded where the model is)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from .checkpoint.agreement import agree
    from .checkpoint.export import read_state
    from .checkpoint.state import mismatch, shapes

    error: CheckpointError | None = None
    state: dict[str, Any] = {}
    try:
        state = read_state(path)
        problem = mismatch("model", name, shapes(get_model_state_dict(model)), shapes(state), "file")
        if problem:
            error = CheckpointError(f"--init-from {path} does not match {problem}.")
    except CheckpointError as e:
        error = e
    agree(runtime.all_gather_object, error)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def _apply_per_rank(result: LoadResult, state: RunState, runtime: Runtime, seed: int) -> None:
    if result.per_rank is not None:
        state.per_rank.load_state_dict(result.per_rank)
    else:  # a rank the saving run did not have: a fresh, reproducible stream
        seed_everything(seed + runtime.rank + 7919 * result.step)


def _resumed(result: LoadResult, run_id: str | None) -> Resumed:
    args = result.manifest.get("args")
    return Resumed(step=result.step, url=result.url, saved_world_size=result.saved_world_size,
                   tracking_run_id=run_id, saved_args=args if isinstance(args, dict) else {})


# ---------------------------------------------------------------- flags that changed since the checkpoint

# Where files go, how the run starts and the device resolved on this machine differ between runs by design.
UNCOMPARED = frozenset({"checkpoint_dir", "output_dir", "model_dir", "resume", "resume_from", "init_from", "device"})


def changed_flags(saved: Mapping[str, Any], current: Mapping[str, Any], url: str) -> list[str]:
    """Pure: the lines that list the arguments differing from those checkpoint `url` recorded, and what wins.

    Both sides are redacted parameters (JSON-ready); names either side lacks are not compared.
    """
    changed = [(name, saved[name], value) for name, value in current.items()
               if name in saved and name not in UNCOMPARED and saved[name] != value]
    if not changed:
        return []
    lines = [f"igniter-dist: flags that differ from the ones {url} was saved with:"]
    for name, before, now in changed:
        flag = "--" + name.replace("_", "-")
        lines.append(f"  {flag} {_shown(now)} (saved: {_shown(before)}): {_what_wins(name, before, now, url)}")
    return lines


def _what_wins(name: str, before: Any, now: Any, url: str) -> str:
    if name == "learning_rate":
        return ("the optimizer restored from the checkpoint keeps its saved learning rate; to train with new "
                f"hyperparameters from these weights, start a fresh run with --init-from {url}")
    if name == "max_epochs" and isinstance(before, int) and isinstance(now, int):
        return f"the run trains on to epoch {now}" if now > before else f"the run ends after epoch {now}"
    return f"{_shown(now)} applies from here on"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)
