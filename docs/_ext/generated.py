"""Sphinx extension: reference content generated from the code.

- ``{exit-codes} script`` / ``{exit-codes} command``: the exit-code tables of `igniter_dist.errors`,
  the same rows `--help` prints in its epilog.
- ``{argparse}``: sphinx-argparse's directive, with its usage blocks shown as plain text rather
  than highlighted as Python.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinxarg.ext import ArgParseDirective

from igniter_dist.errors import COMMAND_EXIT_CODES, SCRIPT_EXIT_CODES

TABLES = {"script": SCRIPT_EXIT_CODES, "command": COMMAND_EXIT_CODES}


class ExitCodes(Directive):
    """A Markdown table of one exit-code table: code, meaning (and detail), what to do."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        rows = TABLES[self.arguments[0]]
        with_fix = any(c.fix for c in rows)
        lines = ["| code | meaning |" + (" what to do |" if with_fix else ""),
                 "| --- | --- |" + (" --- |" if with_fix else "")]
        for c in rows:
            meaning = f"{c.meaning}: {c.detail}" if c.detail else c.meaning
            lines.append(f"| {c.code} | {meaning} |" + (f" {c.fix} |" if with_fix else ""))
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="igniter_dist.errors"), self.content_offset, container)
        return list(container.children)


class PlainUsageArgParse(ArgParseDirective):
    """sphinx-argparse, its literal blocks (usage lines) marked as text so Pygments leaves them alone."""

    def run(self) -> list[Any]:
        result = super().run()
        for node in result:
            for block in node.findall(nodes.literal_block) if isinstance(node, nodes.Node) else []:
                block["language"] = "text"
        return result


def setup(app: Any) -> dict[str, Any]:
    app.setup_extension("sphinxarg.ext")
    app.add_directive("exit-codes", ExitCodes)
    app.add_directive("argparse", PlainUsageArgParse, override=True)
    return {"parallel_read_safe": True}
