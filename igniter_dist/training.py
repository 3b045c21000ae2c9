"""`ig.train` and `ig.evaluate`: assemble runtime, sharded loaders, metrics, checkpoints and sinks, then run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from . import debug
from .checkpoint.probe import check_writable
from .data import shard_eval_loader, shard_train_loader
from .engine import Engine, Loop, check_epoch_length
from .errors import ConfigError
from .metrics import MetricSet
from .redaction import redact
from .resume import Checkpoints, Resumed, RunCheckpoints
from .rng import seed_everything
from .runtime import Runtime, runtime
from .schedule import Every, Schedule, parse_every
from .signals import Interrupted, StopFlag
from .debug import DebugChecks
from .spec import RunSpec
from .steps import StepOptions
from .tracking.base import RunInfo, Sink


def train(
    to_save: Mapping[str, Any],
    train_spec: RunSpec,
    eval_spec: RunSpec | Mapping[str, RunSpec] | None = None,
    *,
    max_epochs: int | None = None,
    epoch_length: int | None = None,
    seed: int = 1,
    eval_every: Every | str | int = 1,
    log_every: int = 50,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    save_every: Every | str | int = 1,
    n_saved: int = 2,
    keep_best: str | None = None,
    save_every_minutes: float | None = None,
    async_checkpoint: bool = False,
    on_checkpoint_error: Literal["stop", "warn"] = "stop",
    output_dir: str | None = "output",
    model_dir: str | None = None,
    model_safetensors: bool = False,
    parameters: Mapping[str, Any] | None = None,
    mlflow: Any = None,
    console: bool = True,
    precision: str = "32",
    accumulate_grad_batches: int = 1,
    grad_clip_norm: float | None = None,
    grad_clip_value: float | None = None,
    debug: bool = False,
    stop_check_every: int = 10,
) -> dict[str, float]:
    """Train `to_save`'s model with `train_spec`, evaluating with `eval_spec`; returns the final metrics.

    Collective: every rank calls it. Resumes from the latest committed checkpoint in
    `checkpoint_dir` (default `<output_dir>/checkpoints`; "none" disables checkpoints) when `resume`.
    """
    rt = runtime()
    _check_prepared(to_save, rt)
    step_options = StepOptions(precision=precision, accumulate_grad_batches=accumulate_grad_batches,  # type: ignore[arg-type]
                               grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)
    if max_epochs is not None:
        train_spec.max_epochs = max_epochs
    if epoch_length is not None:
        train_spec.epoch_length = epoch_length
    params = redact(dict(parameters or {}))
    schedule = Schedule(max_epochs=train_spec.max_epochs, log_every=_positive(log_every, "log_every"),
                        eval_every=parse_every(eval_every), save_every=parse_every(save_every),
                        save_every_minutes=save_every_minutes)
    train_loop = _train_loop(train_spec, rt, seed)
    evaluators = {name: _eval_loop(name, spec, rt) for name, spec in _named(eval_spec).items()}
    checks = None
    if debug:
        schedule, checkpoint_dir, resume, checks = _debug_mode(rt, to_save, train_loop, evaluators, output_dir)
    sinks = _sinks(rt, output_dir, console, mlflow)
    checkpoints = _checkpoints(rt, checkpoint_dir, output_dir, params, seed, n_saved=n_saved,
                               keep_best=keep_best, async_save=async_checkpoint, on_error=on_checkpoint_error)
    model_dir = model_dir or (os.path.join(output_dir, "model") if output_dir else None)
    check_writable(rt, checkpoint_dir=checkpoints.url if checkpoints else None, output_dir=output_dir,
                   model_dir=model_dir)  # collective
    stop = StopFlag(rt.distributed, group=_host_group(rt), check_every=_positive(stop_check_every, "stop_check_every"),
                    is_main=rt.is_main)
    engine = Engine(runtime=rt, train=train_loop, evaluators=evaluators, schedule=schedule, to_save=to_save,
                    sinks=sinks, checkpoints=checkpoints, stop=stop, seed=seed, step_options=step_options,
                    debug=checks)
    status = "FAILED"
    stop.install()
    try:
        seed_everything(seed + rt.rank)  # a fresh run's streams; a resume replaces them from the checkpoint
        resumed = _resume(engine) if resume else None
        run_id = rt.broadcast_object(resumed.tracking_run_id if resumed else None)
        sinks.start(RunInfo(params=params, output_dir=output_dir, resumed_step=resumed.step if resumed else 0,
                            run_id=run_id))
        metrics = engine.run()
        _export(rt, to_save, model_dir, params, sinks, safetensors=model_safetensors)
        status = "FINISHED"
        return metrics
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        stop.restore()
        if checkpoints is not None:
            checkpoints.close()
        sinks.close(status)


def evaluate(
    to_save: Mapping[str, Any],
    eval_spec: RunSpec | Mapping[str, RunSpec],
    *,
    checkpoint_dir: str | None = None,
    step: int | None = None,
    output_dir: str | None = None,
    console: bool = True,
    **_: Any,
) -> dict[str, float]:
    """Collective: run the evaluators alone, on the latest (or `step`) checkpoint when `checkpoint_dir` is set."""
    rt = runtime()
    _check_prepared(to_save, rt)
    if checkpoint_dir and checkpoint_dir.lower() != "none":
        from .checkpoint import CheckpointManager

        manager = CheckpointManager(checkpoint_dir, rt)
        chosen = step if step is not None else manager.latest()
        if chosen is None:
            raise ConfigError(f"No committed checkpoint in {checkpoint_dir}; train first or pass another --checkpoint-dir.")
        manager.load(chosen, dict(to_save))
        manager.close()
    evaluators = {name: _eval_loop(name, spec, rt) for name, spec in _named(eval_spec).items()}
    sinks = _sinks(rt, output_dir, console, None)
    noop = RunSpec(step=lambda e, b: {}, loader=[])
    engine = Engine(runtime=rt, train=Loop("train", noop, [], MetricSet(None, rt.device, rt.distributed), 0),
                    evaluators=evaluators, schedule=Schedule(), to_save=to_save, sinks=sinks)
    sinks.start(RunInfo(output_dir=output_dir))
    try:
        return engine.evaluate()
    finally:
        sinks.close("FINISHED")


# ---------------------------------------------------------------- assembly


def _resume(engine: Engine) -> Resumed | None:
    """Collective: load the latest committed checkpoint into the run, and say so on rank 0."""
    if engine.checkpoints is None:
        return None
    resumed = engine.checkpoints.resume(engine.checkpoint_state())
    if resumed is None:
        return None
    rt, s, max_epochs = engine.runtime, engine.state, engine.schedule.max_epochs
    world = "" if resumed.saved_world_size == rt.world_size else (
        f", resharded from {resumed.saved_world_size} to {rt.world_size} ranks")
    _say(rt, f"igniter-dist: resumed from {resumed.url} (step {s.step}, epoch {s.epoch + 1}, "
             f"iteration {s.iteration}{world})")
    if s.epoch >= max_epochs:
        _say(rt, f"igniter-dist: this run already finished {s.epoch} epochs (--max-epochs {max_epochs}); "
                 "raise --max-epochs to train further.")
    return resumed


def _debug_mode(rt: Runtime, to_save: Mapping[str, Any], train_loop: Loop, evaluators: dict[str, Loop],
                output_dir: str | None) -> tuple[Schedule, str, bool, DebugChecks]:
    """Shrink the run to a few batches and two epochs, in a fresh checkpoint folder, with anomaly detection."""
    train_loop.epoch_length = min(train_loop.epoch_length or debug.TRAIN_BATCHES, debug.TRAIN_BATCHES)
    for loop in evaluators.values():
        loop.max_batches = debug.EVAL_BATCHES
    torch.autograd.set_detect_anomaly(True)
    stamp = rt.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    folder = os.path.join(output_dir or tempfile.gettempdir(), "debug", stamp, "checkpoints")
    if rt.is_main:
        print(debug.summaries(rt, to_save, train_loop, evaluators), file=sys.stderr, flush=True)
    schedule = Schedule(max_epochs=debug.EPOCHS, log_every=1, eval_every=Every(1), save_every=Every(1))
    return schedule, folder, False, debug.DebugChecks(rt)


def _check_prepared(to_save: Mapping[str, Any], rt: Runtime) -> None:
    if not isinstance(to_save, Mapping) or not to_save:
        raise ConfigError("to_save must be a non-empty dict such as {'model': model, 'optimizer': optimizer}.")
    for name, obj in to_save.items():
        if not isinstance(obj, nn.Module) or isinstance(obj, nn.parallel.DistributedDataParallel):
            continue
        trainable = any(p.requires_grad for p in obj.parameters())
        if rt.distributed and trainable:
            raise ConfigError(
                f"to_save[{name!r}] is a plain {type(obj).__name__} but this job has {rt.world_size} ranks, so its "
                "replicas would drift apart; wrap it with model = ig.prepare(model) before building the optimizer."
            )
        dev = next((p.device for p in obj.parameters()), rt.device)
        if dev.type != rt.device.type:
            raise ConfigError(
                f"to_save[{name!r}] lives on {dev} but this rank runs on {rt.device}; "
                "wrap it with model = ig.prepare(model) to move it."
            )


def _named(eval_spec: RunSpec | Mapping[str, RunSpec] | None) -> dict[str, RunSpec]:
    if eval_spec is None:
        return {}
    if isinstance(eval_spec, RunSpec):
        return {"eval": eval_spec}
    if isinstance(eval_spec, Mapping) and all(isinstance(v, RunSpec) for v in eval_spec.values()):
        if "train" in eval_spec:
            raise ConfigError("An evaluator may not be named 'train' (its metrics would mix with training's); rename it.")
        return dict(eval_spec)
    raise ConfigError(f"eval_spec must be a RunSpec or a dict of name -> RunSpec, got {type(eval_spec).__name__}.")


def _train_loop(spec: RunSpec, rt: Runtime, seed: int) -> Loop:
    loader = shard_train_loader(spec.loader, rt.rank, rt.world_size, seed) if _is_loader(spec.loader) else spec.loader
    return Loop("train", spec, loader, MetricSet(spec.metrics, rt.device, rt.distributed),
                check_epoch_length(loader, spec.epoch_length, "training"))


def _eval_loop(name: str, spec: RunSpec, rt: Runtime) -> Loop:
    loader = shard_eval_loader(spec.loader, rt.rank, rt.world_size) if _is_loader(spec.loader) else spec.loader
    return Loop(name, spec, loader, MetricSet(spec.metrics, rt.device, rt.distributed), None)


def _is_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def _positive(value: int, name: str) -> int:
    if int(value) < 1:
        raise ConfigError(f"{name} must be a positive number of iterations, got {value}.")
    return int(value)


def _sinks(rt: Runtime, output_dir: str | None, console: bool, mlflow: Any) -> Sink:
    from .tracking.factory import build_sinks

    return build_sinks(rt, output_dir=output_dir, console=console, mlflow=mlflow)


def _checkpoints(rt: Runtime, checkpoint_dir: str | None, output_dir: str | None, params: dict[str, Any],
                 seed: int, **options: Any) -> Checkpoints | None:
    """Collective when `async_save`: the run's checkpoints, or None when they are off."""
    url = checkpoint_dir or (os.path.join(output_dir, "checkpoints") if output_dir else None)
    if not url or url.lower() == "none":
        return None
    from .checkpoint import CheckpointManager

    return RunCheckpoints(CheckpointManager(url, rt, **options), rt, seed=seed, manifest={"args": params})


def _host_group(rt: Runtime) -> Any:
    """A gloo group for host-side agreements when the default group is nccl (collective: all ranks)."""
    if rt.backend == "nccl":
        return torch.distributed.new_group(backend="gloo")
    return None


def _say(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, file=sys.stderr, flush=True)


def _export(rt: Runtime, to_save: Mapping[str, Any], model_dir: str | None, params: dict[str, Any], sinks: Sink,
            safetensors: bool = False) -> None:
    """Rank 0 writes the consolidated model and the redacted arguments to the model dir."""
    if not rt.is_main or not model_dir:
        return
    from .checkpoint.export import model_state, write_state

    model = next((m for m in to_save.values() if isinstance(m, nn.Module)), None)
    os.makedirs(model_dir, exist_ok=True)
    if model is not None:
        state = model_state(model)  # copied off the device once for every format
        for name in ["model.pt", "model.safetensors"] if safetensors else ["model.pt"]:
            path = os.path.join(model_dir, name)
            write_state(state, path)
            sinks.log_artifact(path)
    args_path = os.path.join(model_dir, "args.json")
    with open(args_path, "w") as f:
        json.dump(params, f, indent=2, sort_keys=True, default=str)
    sinks.log_artifact(args_path)
