"""`igniter_main`: parse flags once, start the runtime, run the user's `main(args)`, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .args import build_parser, parse_args
from .errors import ConfigError, IgniterError
from .options import from_args
from .rng import seed_everything
from .runtime import RuntimeOptions, exit_process, init_runtime, runtime, runtime_was_distributed, shutdown_runtime
from .signals import Interrupted
from .wrapping import PrepareOptions, configure

# pytorch-igniter's igniter_main passed these on to aws-sagemaker-remote; each gets the sentence that
# names its replacement instead of a TypeError.
_SET_DEFAULTS = "set that flag's default in argparse_callback with parser.set_defaults({name}=...)"
_LAUNCH = "launch SageMaker jobs with `igniter-dist launch sagemaker SCRIPT{flag} ...`"
OLD_KEYWORDS: dict[str, str] = {
    "training_args": "set flag defaults in argparse_callback with parser.set_defaults(max_epochs=..., ...)",
    **{name: _SET_DEFAULTS for name in ("model_dir", "output_dir", "checkpoint_dir", "workers")},
    **{name: _LAUNCH.format(flag=f" {flag}" if flag else "") for name, flag in (
        ("training_instance", "--instance-type TYPE"), ("training_image", "--image URI"),
        ("training_image_path", "--image URI"), ("training_image_accounts", "--image URI"),
        ("training_role", "--role ARN"), ("job_name", "--job-name NAME"), ("base_job_name", "--job-name NAME"),
        ("source", "--source-dir DIR"), ("dependencies", "--source-dir DIR"), ("spot_instances", "--spot"),
        ("volume_size", "--volume-size GB"), ("max_run", "--max-run SECONDS"), ("max_wait", "--max-wait SECONDS"),
        ("env", "--env KEY=VALUE"), ("wait", "--wait true"), ("output_json", "--dry-run"),
        ("checkpoint_s3", "--checkpoint-s3-uri S3_URI"), ("checkpoint_initial", "--checkpoint-s3-uri S3_URI"),
        ("checkpoint_container", "--checkpoint-mode sync"), ("additional_arguments", "-- --key value"),
        ("run", ""), ("enable_sagemaker", ""), ("script", ""), ("profile", ""))},
    "metrics": "metrics go to metrics.jsonl and MLflow (--mlflow-enable true), not to SageMaker metric definitions",
    "experiment_name": "track runs in MLflow with --mlflow-experiment-name",
    "trial_name": "name MLflow runs with --mlflow-run-name",
}


def igniter_main(
    main: Callable[[argparse.Namespace], Any],
    inputs: dict[str, str] | None = None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None = None,
    description: str | None = None,
    argv: list[str] | None = None,
    **old_keywords: Any,
) -> None:
    """Entry point of a training script: the same script runs under python, torchrun and SageMaker.

    Parses the flags once, starts the runtime (after which `args.device` holds this rank's
    device, such as ``"cuda:3"`` or ``"cpu"``), seeds every RNG from `--seed` and calls
    `main(args)`. Exits 0 on success, 2 on bad input (one sentence on stderr; also for a keyword
    of pytorch-igniter's igniter_main, naming what replaces it), 3 when a checkpoint cannot be
    written, found or loaded, 128 + N after signal N (the checkpoint of that step saved), 1 on
    any other error.
    """
    code = 0
    rank_prefix = ""
    agreed_exit = False
    try:
        _refuse(old_keywords)
        args = parse_args(build_parser(inputs, argparse_callback, description), argv)
        settings = from_args(RuntimeOptions, args)
        rt = init_runtime(device=settings.device, timeout_s=settings.dist_timeout,
                          deterministic=settings.deterministic, debug=args.debug)
        args.device = str(rt.device)  # resolved: `tensor.to(args.device)` works, "auto" never reaches main
        # What ig.prepare does where the script does not say; fsdp/hsdp also gather parameters in --precision.
        configure(replace(from_args(PrepareOptions, args), precision=args.precision))
        rank_prefix = f"[rank {rt.rank}] " if rt.distributed else ""
        seed_everything(args.seed)  # identical model initialisation on every rank
        main(args)
        agreed_exit = True
    except Interrupted as e:
        code = e.exit_code
        agreed_exit = True  # every rank stopped on the same step
        print(f"{rank_prefix}igniter-dist: {e}; exiting with {code}", file=sys.stderr, flush=True)
    except IgniterError as e:
        code = e.exit_code
        print(f"{rank_prefix}error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        distributed = runtime_was_distributed()
        shutdown_runtime(barrier=agreed_exit)
        configure(PrepareOptions())
    exit_process(code, distributed)


def _refuse(old_keywords: dict[str, Any]) -> None:
    """ConfigError for a keyword igniter_main does not take, naming what replaces a pytorch-igniter one."""
    if not old_keywords:
        return
    name = next(iter(old_keywords))
    if name in OLD_KEYWORDS:
        raise ConfigError(f"igniter_main() no longer takes {name}= (a pytorch-igniter keyword): "
                          f"{OLD_KEYWORDS[name].format(name=name)}; see docs/howto/migrating.md.")
    raise ConfigError(f"igniter_main() got an unknown keyword {name!r}; it takes main, inputs, argparse_callback, "
                      "description and argv.")


__all__ = ["igniter_main", "runtime"]
