"""How `--help` reads, for a training script and for the `igniter-dist` commands alike: each default
shown once, as it is typed; `{true,false}` for booleans; an exit-code table as the epilog."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterable

from .errors import ExitCode
from .values import parse_bool

BOOLEAN = "{true,false}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` to an option's help unless it has no default or its help names one already;
    shows booleans' defaults as typed (`false`, not `False`) and their metavar as `{true,false}`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, "", argparse.SUPPRESS) or default == [] or default == {}
                or "(default" in text):
            return text
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        return f"{text.removesuffix('.')} (default: {shown.replace('%', '%%')})."

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return BOOLEAN if action.type is parse_bool else super()._get_default_metavar_for_optional(action)


def exit_codes_epilog(codes: Iterable[ExitCode], width: int = 88) -> str:
    """The exit-code table as plain text for an epilog: `  2      bad input ...`, wrapped to `width`."""
    rows = list(codes)
    column = max(len(c.code) for c in rows) + 4
    lines = ["exit codes:"]
    for c in rows:
        lines += textwrap.wrap(c.meaning, width, initial_indent=f"  {c.code:<{column - 2}}",
                               subsequent_indent=" " * column)
    return "\n".join(lines)
