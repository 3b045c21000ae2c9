"""The standard command-line flags: one parser, parsed once; `train_kwargs` maps flags to engine keywords."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from . import sagemaker
from .errors import ConfigError
from .schedule import Every, parse_every
from .values import non_negative_int, parse_bool, positive_float, positive_int

class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so errors follow one path."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}. Run with --help for the list of flags.")


def build_parser(
    inputs: dict[str, str] | None = None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """The full parser: standard groups, one `--<input>` per declared input, then the script's flags."""
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=positive_int, default=64, help="Training batch size per process.")
    t.add_argument("--eval-batch-size", type=positive_int, default=None,
                   help="Evaluation batch size per process (default: --batch-size).")
    t.add_argument("--max-epochs", type=positive_int, default=10, help="Epochs to train; raise it on resume to extend a run.")
    t.add_argument("--epoch-length", type=positive_int, default=None,
                   help="Iterations per epoch (default: one pass over the training loader).")
    t.add_argument("--learning-rate", type=positive_float, default=3e-4, help="Learning rate for the optimizer.")
    t.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes per rank.")
    t.add_argument("--seed", type=int, default=1, help="Seed for model init, shuffling and every rank's RNGs.")
    t.add_argument("--eval-every", type=parse_every, default=Every(1),
                   help="Evaluate every N epochs (2, 2epochs) or N iterations (500steps); 0 never.")
    t.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"], default="32",
                   help="32: full precision; bf16-mixed / 16-mixed: autocast (16-mixed adds a checkpointed GradScaler).")
    t.add_argument("--accumulate-grad-batches", type=positive_int, default=1,
                   help="Micro-batches per optimizer step; DDP all-reduces only on the last one (engine.backward/optimizer_step).")
    t.add_argument("--grad-clip-norm", type=positive_float, default=None,
                   help="Clip the total gradient norm of each optimizer step to this value.")
    t.add_argument("--grad-clip-value", type=positive_float, default=None,
                   help="Clip every gradient element to [-value, value].")
    t.add_argument("--compile", type=parse_bool, default=False, help="torch.compile the model in ig.prepare.")
    t.add_argument("--deterministic", type=parse_bool, default=False,
                   help="Use deterministic algorithms only (and set CUBLAS_WORKSPACE_CONFIG).")
    t.add_argument("--debug", type=parse_bool, default=False,
                   help="A fast check of the whole script: 2 epochs of a few batches, a checkpoint round trip, "
                        "anomaly detection, replica agreement and summaries.")

    d = p.add_argument_group("distributed")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; each rank binds cuda:<local_rank>.")
    d.add_argument("--dist-timeout", type=positive_float, default=1800.0,
                   help="Seconds a collective may wait before the process group fails.")
    d.add_argument("--stop-check-every", type=positive_int, default=10,
                   help="Most steps between the ranks' agreements on a stop signal (a non-blocking "
                        "all-reduce); slow steps agree more often, about every 0.25 s.")
    d.add_argument("--find-unused-parameters", type=parse_bool, default=False,
                   help="Let DDP handle parameters that get no gradient in a step (slower).")
    d.add_argument("--sync-batchnorm", type=parse_bool, default=False,
                   help="Convert BatchNorm layers to SyncBatchNorm when distributed.")

    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", default=sagemaker.checkpoint_dir(),
                   help="Folder or fsspec URL (s3://bucket/prefix) for checkpoints, or none (default: "
                        "<output-dir>/checkpoints; inside SageMaker /opt/ml/checkpoints or an s3:// "
                        "checkpoint-dir hyperparameter).")
    c.add_argument("--resume", type=parse_bool, default=True,
                   help="Resume from the latest committed checkpoint in --checkpoint-dir.")
    c.add_argument("--save-every", type=parse_every, default=Every(1),
                   help="Save every N epochs (1, 1epochs) or N iterations (500steps); 0 saves only at the end.")
    c.add_argument("--n-saved", type=positive_int, default=2, help="Committed checkpoints to keep.")
    c.add_argument("--keep-best", default=None,
                   help="Also keep the best checkpoint by a logged metric, as NAME:max or NAME:min (eval/accuracy:max).")
    c.add_argument("--save-every-minutes", type=positive_float, default=None,
                   help="Also save when this many minutes passed since the last save.")
    c.add_argument("--async-checkpoint", type=parse_bool, default=False,
                   help="Write checkpoints in the background; the loop waits only for the copy off the device.")
    c.add_argument("--on-checkpoint-error", choices=["stop", "warn"], default="stop",
                   help="stop: end the run when a save fails; warn: keep training and retry at the next save.")

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=sagemaker.output_dir() or "output",
                   help="Folder for metrics history and other outputs (SM_OUTPUT_DATA_DIR inside SageMaker).")
    o.add_argument("--model-dir", default=sagemaker.model_dir() or None,
                   help="Folder for the final model.pt and args.json (default: <output-dir>/model; SM_MODEL_DIR inside SageMaker).")
    o.add_argument("--model-safetensors", type=parse_bool, default=False,
                   help="Also write the final model as model.safetensors (needs the safetensors package).")
    o.add_argument("--log-every", type=positive_int, default=50,
                   help="Compute and log training metrics every N iterations.")

    from .tracking.flags import add_mlflow_flags  # the tracking package owns its flags

    add_mlflow_flags(p)

    if inputs:
        i = p.add_argument_group("inputs")
        for name, default in inputs.items():
            flag = "--" + name.replace("_", "-")
            i.add_argument(flag, dest=name.replace("-", "_"), default=sagemaker.channel_dir(name) or default,
                           help=f"Input '{name}' (SM_CHANNEL_{name.upper()} inside SageMaker).")

    if argparse_callback is not None:
        argparse_callback(p)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse once; SageMaker's own `--sagemaker_*` hyperparameters are dropped inside a job only."""
    args, unknown = parser.parse_known_args(argv)
    leftovers = sagemaker.script_leftovers(unknown)
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    return args


def parser_for_docs() -> argparse.ArgumentParser:
    """The full standard parser, with one example input, for the flag reference in the docs."""
    return build_parser(inputs={"data": "data"}, description="Flags every igniter-dist script accepts.")


def train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's keyword arguments out of parsed flags, for `ig.train(**train_kwargs(args))`."""
    from .tracking.factory import MlflowConfig

    return {
        "max_epochs": args.max_epochs,
        "epoch_length": args.epoch_length,
        "seed": args.seed,
        "eval_every": args.eval_every,
        "log_every": args.log_every,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
        "save_every": args.save_every,
        "n_saved": args.n_saved,
        "keep_best": args.keep_best,
        "save_every_minutes": args.save_every_minutes,
        "async_checkpoint": args.async_checkpoint,
        "on_checkpoint_error": args.on_checkpoint_error,
        "output_dir": args.output_dir,
        "model_dir": args.model_dir,
        "model_safetensors": args.model_safetensors,
        "mlflow": MlflowConfig.from_args(args),
        "precision": args.precision,
        "accumulate_grad_batches": args.accumulate_grad_batches,
        "grad_clip_norm": args.grad_clip_norm,
        "grad_clip_value": args.grad_clip_value,
        "debug": args.debug,
        "stop_check_every": args.stop_check_every,
    }
