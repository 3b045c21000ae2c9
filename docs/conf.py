"""Sphinx configuration for the igniter-dist documentation (built by `make docs` and tests/test_docs.py)."""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(DOCS, "_ext"))  # cli_parsers (parsers for sphinx-argparse), generated (directives)
sys.path.insert(0, os.path.dirname(DOCS))  # igniter_dist itself, also when it is not installed

import igniter_dist

project = "igniter-dist"
author = "igniter-dist authors"
copyright = "2026, igniter-dist authors"
release = igniter_dist.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "generated",  # docs/_ext/generated.py: exit-code tables from the code, plain-text usage blocks
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# MyST: anchors for `page.md#heading` links; `{eval-rst}` and directives in fences.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: the public API only, in source order, type hints in the description.
autodoc_default_options = {"members": False, "undoc-members": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"igniter-dist {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
smartquotes = False  # keep `--flag` in docstrings as two hyphens
pygments_style = "sphinx"
pygments_dark_style = "monokai"
