"""The command line: one parser, parsed once, its standard flags read from the options dataclasses.

`train_kwargs(args)` maps the parsed flags back to the keywords of `ig.train`. The flags of each
component are declared beside it (`TrainOptions`, `StepOptions`, `PrepareOptions`, ...; see
`options.py`); this module only assembles them, adds the inputs and the script's own flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from . import sagemaker
from .errors import SCRIPT_EXIT_CODES, ConfigError
from .helptext import HelpFormatter, exit_codes_epilog
from .options import Options, add_flags, flag_values, option
from .runtime import RuntimeOptions
from .steps import StepOptions
from .tracking.factory import MlflowConfig
from .tracking.flags import MlflowFlags
from .training import CLI_MAX_EPOCHS, TrainOptions
from .values import non_negative_int, positive_float, positive_int
from .wrapping import PrepareOptions


@dataclass(frozen=True)
class ScriptOptions(Options):
    """Standard flags the script itself reads from `args` (the engine never sees them)."""

    batch_size: int = option(64, group="training", parse=positive_int, help="Training batch size per process.")
    eval_batch_size: int | None = option(None, group="training", parse=positive_int,
                                         help="Evaluation batch size per process (default: --batch-size).")
    learning_rate: float = option(3e-4, group="training", parse=positive_float,
                                  help="Learning rate for the optimizer.")
    workers: int = option(2, group="training", parse=non_negative_int, help="DataLoader worker processes per rank.")


# Every standard flag, by the component that reads it; within a --help group flags follow this order.
STANDARD = (ScriptOptions, RuntimeOptions, PrepareOptions, TrainOptions, StepOptions, MlflowFlags)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so errors follow one path."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}. Run with --help for the list of flags.")


def build_parser(
    inputs: dict[str, str] | None = None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """The full parser: standard groups, one `--<input>` per declared input, then the script's flags."""
    p = _Parser(description=description, formatter_class=HelpFormatter, epilog=exit_codes_epilog(SCRIPT_EXIT_CODES))
    add_flags(p, STANDARD)
    if inputs:
        i = p.add_argument_group("inputs")
        for name, default in inputs.items():
            flag = "--" + name.replace("_", "-")
            i.add_argument(flag, dest=name.replace("-", "_"), default=sagemaker.channel_dir(name) or default,
                           help=f"Input '{name}'; SM_CHANNEL_{name.upper()} inside SageMaker.")
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
    """The engine's keyword arguments out of parsed flags, for `ig.train(**train_kwargs(args))`.

    The command line trains CLI_MAX_EPOCHS epochs unless --max-epochs or --max-steps says otherwise.
    """
    kwargs = {**flag_values(args, TrainOptions), **flag_values(args, StepOptions),
              "mlflow": MlflowConfig.from_args(args)}
    if kwargs.get("max_epochs") is None and kwargs.get("max_steps") is None:
        kwargs["max_epochs"] = CLI_MAX_EPOCHS
    return kwargs
