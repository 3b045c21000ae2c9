"""Parsers for the docs' reference pages, built from the code so help texts have one source."""

from __future__ import annotations

import argparse
import importlib

from igniter_dist import cli


def igniter_dist_command() -> argparse.ArgumentParser:
    """The `igniter-dist` command with every subcommand registered (the CLI registers only the one it runs)."""
    parser = argparse.ArgumentParser(prog="igniter-dist", description=cli.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in cli.COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).register(sp)
    return parser
