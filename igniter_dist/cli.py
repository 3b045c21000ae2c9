"""The `igniter-dist` command: checkpoint tools, the SageMaker entrypoint and launchers.

Each subcommand's module registers its own parser and is imported lazily, only when used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import IgniterError

# subcommand -> (module that implements it, one-line help). Each module has
# `register(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "checkpoints": ("igniter_dist.checkpoint.commands", "List, show, verify and export checkpoints."),
    "sagemaker-entrypoint": ("igniter_dist.sagemaker.entrypoint", "Run a script under torchrun inside a SageMaker job."),
    "launch": ("igniter_dist.sagemaker.launcher", "Launch a training job (SageMaker)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igniter-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        # Register lazily only the chosen command, so `--help` stays fast and extras stay optional.
        if len(sys.argv) > 1 and sys.argv[1] == name:
            importlib.import_module(module).register(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(sys.argv[1:])
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except IgniterError as e:
        print(f"igniter-dist: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
