"""igniter-dist: checkpoint tools, the SageMaker entrypoint and job launchers.

Each subcommand's module registers its own parser and is imported lazily, only when used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import COMMAND_EXIT_CODES, IgniterError
from .helptext import HelpFormatter, exit_codes_epilog

# subcommand -> (module that implements it, one-line help). Each module has
# `register(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "checkpoints": ("igniter_dist.checkpoint.commands", "List, show, verify and export checkpoints."),
    "launch": ("igniter_dist.sagemaker.launcher", "Launch a training job (on SageMaker)."),
    "sagemaker-entrypoint": ("igniter_dist.sagemaker.entrypoint",
                             "Inside a SageMaker job: run a script under torchrun on this host."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `igniter-dist` parser, with the options of `command` (the one about to run) registered."""
    epilog = "igniter-dist COMMAND --help shows a command's options.\n\n" + exit_codes_epilog(COMMAND_EXIT_CODES)
    parser = argparse.ArgumentParser(prog="igniter-dist", description=__doc__.splitlines()[0], epilog=epilog,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        # Only the chosen command is imported, so `--help` stays fast and extras stay optional.
        if name == command:
            importlib.import_module(module).register(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
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
