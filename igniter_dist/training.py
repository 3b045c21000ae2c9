"""`ig.train` and `ig.evaluate`: assemble runtime, sharded loaders, metrics, checkpoints and sinks, then run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import torch
from torch import nn

from . import debug, sagemaker
from .checkpoint.probe import check_writable
from .data import shard_eval_loader, shard_train_loader
from .debug import DebugChecks
from .engine import Engine, Loop, check_epoch_length
from .errors import ConfigError
from .metrics import MetricSet
from .options import Options, from_keywords, keywords_from, option
from .parallel import is_sharded
from .redaction import redact
from .resume import Checkpoints, Resumed, RunCheckpoints, changed_flags, init_from, resume_from
from .rng import seed_everything
from .runtime import Runtime, runtime
from .schedule import Every, Schedule, parse_every
from .signals import Interrupted, StopFlag, protect_workers
from .spec import RunSpec
from .steps import StepOptions
from .tracking.base import RunInfo, RunStatus, Sink
from .values import parse_bool, positive_float, positive_int

if TYPE_CHECKING:
    from .tracking.factory import MlflowConfig


CLI_MAX_EPOCHS = 10  # the command line's epochs when neither --max-epochs nor --max-steps is given


@dataclass(frozen=True)
class TrainOptions(Options):
    """The keywords of `ig.train` besides its `StepOptions`; most are also standard flags."""

    max_epochs: int | None = option(
        None, group="training", parse=positive_int,
        help=f"Epochs to train (default: {CLI_MAX_EPOCHS}, or no limit when --max-steps is given); raise it on "
             "resume to extend a run.")
    max_steps: int | None = option(
        None, group="training", parse=positive_int,
        help="Optimizer steps to train (one per --accumulate-grad-batches batches), even mid-epoch; with "
             "--max-epochs too, whichever comes first. Raise it on resume to extend a run.")
    epoch_length: int | None = option(
        None, group="training", parse=positive_int,
        help="Iterations per epoch (default: one pass over the training loader).")
    seed: int = option(1, group="training", parse=int, help="Seed for model init, shuffling and every rank's RNGs.")
    eval_every: Every = option(
        Every(1), group="training", parse=parse_every,
        help="Evaluate every N epochs (2, 2epochs) or N iterations (500steps); 0 never.")
    debug: bool = option(
        False, group="training", parse=parse_bool,
        help="A fast check of the whole script: 2 epochs of a few batches, a checkpoint round trip, "
             "anomaly detection, replica agreement and summaries.")
    stop_check_every: int = option(
        10, group="distributed", parse=positive_int,
        help="Most steps between the ranks' agreements on a stop signal (a non-blocking "
             "all-reduce); slow steps agree more often, about every 0.25 s.")
    checkpoint_dir: str | None = option(
        None, group="checkpoints", cli_default=sagemaker.checkpoint_dir,
        help="Folder or fsspec URL (s3://bucket/prefix) for checkpoints, or none (default: "
             "<output-dir>/checkpoints; inside SageMaker /opt/ml/checkpoints or an s3:// "
             "checkpoint-dir hyperparameter).")
    resume: bool = option(
        True, group="checkpoints", parse=parse_bool,
        help="Resume from the latest committed checkpoint in --checkpoint-dir.")
    resume_from: str | None = option(
        None, group="checkpoints",
        help="A committed step folder or URL (of any run) to resume the full state from, as a new run; "
             "ignored once --checkpoint-dir holds a checkpoint, whose latest wins.")
    init_from: str | None = option(
        None, group="checkpoints",
        help="Model weights to start a fresh run from (step 0, a fresh optimizer): a step folder, model.pt or "
             "model.safetensors; ignored once --checkpoint-dir holds a checkpoint, whose latest wins.")
    save_every: Every = option(
        Every(1), group="checkpoints", parse=parse_every,
        help="Save every N epochs (1, 1epochs) or N iterations (500steps); 0 saves only at the end.")
    n_saved: int = option(2, group="checkpoints", parse=positive_int, help="Committed checkpoints to keep.")
    keep_best: str | None = option(
        None, group="checkpoints",
        help="Also keep the best checkpoint by a logged metric, as NAME:max or NAME:min (eval/accuracy:max).")
    save_every_minutes: float | None = option(
        None, group="checkpoints", parse=positive_float,
        help="Also save when this many minutes passed since the last save.")
    async_checkpoint: bool = option(
        False, group="checkpoints", parse=parse_bool,
        help="Write checkpoints in the background; the loop waits only for the copy off the device.")
    on_checkpoint_error: Literal["stop", "warn"] = option(
        "stop", group="checkpoints", choices=("stop", "warn"),
        help="stop: end the run when a save fails; warn: keep training and retry at the next save.")
    output_dir: str | None = option(
        "output", group="output", cli_default=lambda: sagemaker.output_dir() or "output",
        help="Folder for metrics history and other outputs (SM_OUTPUT_DATA_DIR inside SageMaker).")
    model_dir: str | None = option(
        None, group="output", cli_default=lambda: sagemaker.model_dir() or None,
        help="Folder for the final model.pt and args.json (default: <output-dir>/model; SM_MODEL_DIR inside "
             "SageMaker).")
    model_safetensors: bool = option(
        False, group="output", parse=parse_bool,
        help="Also write the final model as model.safetensors (needs the safetensors package).")
    log_every: int = option(
        50, group="output", parse=positive_int, help="Compute and log training metrics every N iterations.")
    parameters: Mapping[str, Any] | None = option(
        None, group=None,
        help="The run's arguments, such as vars(args): written, secrets redacted, to MLflow, args.json and "
             "every checkpoint.")
    mlflow: MlflowConfig | None = option(
        None, group=None, help="MLflow settings; ig.train_kwargs builds them from the --mlflow-* flags.")
    console: bool = option(True, group=None, parse=parse_bool, help="Print progress and metrics on rank 0.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume_from and self.init_from:
            raise ConfigError(f"--resume-from {self.resume_from} and --init-from {self.init_from} both choose where "
                              "the run starts; pass one of them.")


@keywords_from(TrainOptions, StepOptions)
def train(
    to_save: Mapping[str, Any],
    train_spec: RunSpec,
    eval_spec: RunSpec | Mapping[str, RunSpec] | None = None,
    **options: Any,
) -> dict[str, float]:
    """Train `to_save`'s model with `train_spec`, evaluating with `eval_spec`; returns the final metrics.

    Collective: every rank calls it. Resumes from the latest committed checkpoint in
    `checkpoint_dir` (default `<output_dir>/checkpoints`; "none" disables checkpoints) when `resume`.
    `ig.train_kwargs(args)` gives every keyword that has a flag.

    Args:
        to_save: What a checkpoint holds, by name: the model (prepared with `ig.prepare`; the first
            `nn.Module` is the one exported to the model dir), optimizers, schedulers and anything with
            `state_dict()`/`load_state_dict()`.
        train_spec: The training step function, its loader and the metrics to log as `train/...`.
        eval_spec: One evaluator (metrics logged as `eval/...`), several by name (`<name>/...`), or None to
            train without evaluating.

    Returns:
        The final metrics, as floats, the same on every rank.
    """
    o, step_options = from_keywords("ig.train", options, TrainOptions, StepOptions)
    rt = runtime()
    _check_prepared(to_save, rt)
    params = redact(o.parameters or {})
    engine = _assemble(rt, to_save, train_spec, eval_spec, o, step_options, params)
    status: RunStatus = "FAILED"
    engine.stop.install()
    try:
        seed_everything(o.seed + rt.rank)  # a fresh run's streams; a resume replaces them from the checkpoint
        resumed = None if o.debug else _start(engine, o, params)  # debug mode: a fresh folder, a fresh start
        run_id = rt.broadcast_object(resumed.tracking_run_id if resumed else None)
        engine.sinks.start(RunInfo(params=params, output_dir=o.output_dir,
                                   resumed_step=resumed.step if resumed else 0, run_id=run_id))
        with engine.stepper.attached():  # a plain optimizer.step() honours accumulation and clipping too
            metrics = engine.run()
        _export(rt, to_save, o, params, engine.sinks)
        status = "FINISHED"
        return metrics
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        engine.stop.restore()
        if engine.checkpoints is not None:
            engine.checkpoints.close()
        engine.sinks.close(status)


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
            raise ConfigError(f"No committed checkpoint in {checkpoint_dir}; train first or pass another "
                              "--checkpoint-dir.")
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


def _assemble(rt: Runtime, to_save: Mapping[str, Any], train_spec: RunSpec,
              eval_spec: RunSpec | Mapping[str, RunSpec] | None, o: TrainOptions, step_options: StepOptions,
              params: dict[str, Any]) -> Engine:
    """Collective: the engine and its collaborators (sharded loops, schedule, sinks, checkpoints, stop flag)."""
    spec = replace(train_spec,  # a copy: the user's RunSpec stays as given
                   max_epochs=_max_epochs(o, train_spec),
                   epoch_length=train_spec.epoch_length if o.epoch_length is None else o.epoch_length)
    train_loop = _train_loop(spec, rt, o.seed)
    evaluators = {name: _eval_loop(name, s, rt) for name, s in _named(eval_spec).items()}
    schedule = Schedule(max_epochs=spec.max_epochs, max_steps=o.max_steps, log_every=o.log_every,
                        eval_every=o.eval_every, save_every=o.save_every, save_every_minutes=o.save_every_minutes)
    checkpoint_dir, checks = o.checkpoint_dir, None
    if o.debug:
        schedule, checkpoint_dir, checks = _debug_mode(rt, to_save, train_loop, evaluators, o.output_dir)
    sinks = _sinks(rt, o.output_dir, o.console, o.mlflow, summary_of=o.keep_best or "")
    checkpoints = _checkpoints(rt, checkpoint_dir, o, params)
    check_writable(rt, checkpoint_dir=checkpoints.url if checkpoints else None, output_dir=o.output_dir,
                   model_dir=_model_dir(o))  # collective: before the first step, not at the first save
    stop = StopFlag(rt.distributed, group=_host_group(rt), check_every=o.stop_check_every, is_main=rt.is_main)
    return Engine(runtime=rt, train=train_loop, evaluators=evaluators, schedule=schedule, to_save=to_save,
                  sinks=sinks, checkpoints=checkpoints, stop=stop, seed=o.seed, step_options=step_options,
                  debug=checks)


def _max_epochs(o: TrainOptions, spec: RunSpec) -> int | None:
    """The epoch limit: the keyword (or flag), else the RunSpec's, else 1, or none when max_steps decides."""
    if o.max_epochs is not None:
        return o.max_epochs
    if spec.max_epochs is not None:
        return spec.max_epochs
    return None if o.max_steps is not None else 1


def _start(engine: Engine, o: TrainOptions, params: dict[str, Any]) -> Resumed | None:
    """Collective: load where the run starts, and say so on rank 0.

    This run's own latest checkpoint wins (with `resume`), so that a restart of the same command never
    loses progress; before there is one, `--resume-from` or `--init-from` applies.
    """
    rt, state = engine.runtime, engine.checkpoint_state()
    own = engine.checkpoints.resume(state) if o.resume and engine.checkpoints is not None else None
    given = f"--resume-from {o.resume_from}" if o.resume_from else f"--init-from {o.init_from}" if o.init_from else ""
    if own is not None:
        if given:
            _say(rt, f"igniter-dist: {given} is ignored: {engine.checkpoints.url if engine.checkpoints else ''} "
                     "holds this run's own checkpoints, and its latest wins so that a restart never loses progress.")
        resumed = own
    elif o.resume_from:
        resumed = resume_from(o.resume_from, state, rt, o.seed)
    elif o.init_from:
        _say(rt, f"igniter-dist: loaded {init_from(o.init_from, engine.to_save, rt)}; training starts at step 0 "
                 "with a fresh optimizer.")
        return None
    else:
        return None
    s, sched = engine.state, engine.schedule
    world = "" if resumed.saved_world_size == rt.world_size else (
        f", resharded from {resumed.saved_world_size} to {rt.world_size} ranks")
    where = f"epoch {s.epoch + 1}, iteration {s.iteration}" if s.iteration else f"after epoch {s.epoch}"
    _say(rt, f"igniter-dist: resumed from {resumed.url} (step {s.step}, {where}{world})")
    for line in changed_flags(resumed.saved_args, params, resumed.url):
        _say(rt, line)
    if sched.done(s.epoch, s.optimizer_step):
        limits = [f"--max-epochs {sched.max_epochs}"] if sched.max_epochs is not None else []
        limits += [f"--max-steps {sched.max_steps}"] if sched.max_steps is not None else []
        _say(rt, f"igniter-dist: this run already finished ({s.epoch} epochs, {s.optimizer_step} optimizer steps; "
                 f"{' and '.join(limits)}); raise {' or '.join(x.split()[0] for x in limits)} to train further.")
    return resumed


def _debug_mode(rt: Runtime, to_save: Mapping[str, Any], train_loop: Loop, evaluators: dict[str, Loop],
                output_dir: str | None) -> tuple[Schedule, str, DebugChecks]:
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
    return schedule, folder, debug.DebugChecks(rt)


def _check_prepared(to_save: Mapping[str, Any], rt: Runtime) -> None:
    if not isinstance(to_save, Mapping) or not to_save:
        raise ConfigError("to_save must be a non-empty dict such as {'model': model, 'optimizer': optimizer}.")
    for name, obj in to_save.items():
        if not isinstance(obj, nn.Module) or isinstance(obj, nn.parallel.DistributedDataParallel) or is_sharded(obj):
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
            raise ConfigError("An evaluator may not be named 'train' (its metrics would mix with training's); "
                              "rename it.")
        return dict(eval_spec)
    raise ConfigError(f"eval_spec must be a RunSpec or a dict of name -> RunSpec, got {type(eval_spec).__name__}.")


def _train_loop(spec: RunSpec, rt: Runtime, seed: int) -> Loop:
    loader = shard_train_loader(spec.loader, rt.rank, rt.world_size, seed) if _is_loader(spec.loader) else spec.loader
    protect_workers(loader)
    return Loop("train", spec, loader, MetricSet(spec.metrics, rt.device, rt.distributed),
                check_epoch_length(loader, spec.epoch_length, "training"))


def _eval_loop(name: str, spec: RunSpec, rt: Runtime) -> Loop:
    loader = shard_eval_loader(spec.loader, rt.rank, rt.world_size) if _is_loader(spec.loader) else spec.loader
    protect_workers(loader)
    return Loop(name, spec, loader, MetricSet(spec.metrics, rt.device, rt.distributed), None)


def _is_loader(obj: Any) -> TypeGuard[torch.utils.data.DataLoader[Any]]:
    return isinstance(obj, torch.utils.data.DataLoader)


def _sinks(rt: Runtime, output_dir: str | None, console: bool, mlflow: MlflowConfig | None, *,
           summary_of: str | None = None) -> Sink:
    """The run's sinks; a training run (`summary_of` set, "" without --keep-best) ends with a summary."""
    from .checkpoint.retention import parse_keep_best
    from .tracking.factory import build_sinks

    return build_sinks(rt, output_dir=output_dir, console=console, mlflow=mlflow, summary=summary_of is not None,
                       best=parse_keep_best(summary_of))


def _checkpoints(rt: Runtime, checkpoint_dir: str | None, o: TrainOptions,
                 params: dict[str, Any]) -> Checkpoints | None:
    """Collective when `--async-checkpoint`: the run's checkpoints, or None when they are off."""
    url = checkpoint_dir or (os.path.join(o.output_dir, "checkpoints") if o.output_dir else None)
    if not url or url.lower() == "none":
        return None
    from .checkpoint import CheckpointManager

    manager = CheckpointManager(url, rt, n_saved=o.n_saved, keep_best=o.keep_best, async_save=o.async_checkpoint,
                                on_error=o.on_checkpoint_error)
    return RunCheckpoints(manager, rt, seed=o.seed, manifest={"args": params})


def _host_group(rt: Runtime) -> Any:
    """A gloo group for host-side agreements when the default group is nccl (collective: all ranks)."""
    if rt.backend == "nccl":
        return torch.distributed.new_group(backend="gloo")
    return None


def _say(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, file=sys.stderr, flush=True)


def _export(rt: Runtime, to_save: Mapping[str, Any], o: TrainOptions, params: dict[str, Any], sinks: Sink) -> None:
    """Rank 0 writes the consolidated model and the redacted arguments to the model dir.

    Collective when the model is sharded: every rank takes part in gathering it to rank 0."""
    model_dir = _model_dir(o)
    if not model_dir:
        return
    from .checkpoint.export import model_state, write_state

    model = next((m for m in to_save.values() if isinstance(m, nn.Module)), None)
    gathered = model_state(model) if model is not None and is_sharded(model) else None
    if not rt.is_main:
        return
    os.makedirs(model_dir, exist_ok=True)
    if model is not None:
        state = gathered if gathered is not None else model_state(model)  # off the device once for every format
        for name in ["model.pt", "model.safetensors"] if o.model_safetensors else ["model.pt"]:
            path = os.path.join(model_dir, name)
            write_state(state, path)
            sinks.log_artifact(path)
    args_path = os.path.join(model_dir, "args.json")
    with open(args_path, "w") as f:
        json.dump(params, f, indent=2, sort_keys=True, default=str)
    sinks.log_artifact(args_path)


def _model_dir(o: TrainOptions) -> str | None:
    return o.model_dir or (os.path.join(o.output_dir, "model") if o.output_dir else None)
