"""The options of a run: how `ig.prepare` follows the flags `igniter_main` parsed."""

from __future__ import annotations

import pytest
from torch import nn

import igniter_dist as ig


def test_prepare_follows_the_flags_igniter_main_parsed_unless_the_script_says():
    seen = {}

    def main(args):
        seen["flag"] = ig.prepare(nn.Linear(2, 2))
        seen["script"] = ig.prepare(nn.Linear(2, 2), compile=False)

    with pytest.raises(SystemExit) as exit_:
        ig.igniter_main(main, argv=["--compile", "true", "--device", "cpu"])
    assert exit_.value.code == 0
    assert hasattr(seen["flag"], "_orig_mod") and not hasattr(seen["script"], "_orig_mod")
    assert not hasattr(ig.prepare(nn.Linear(2, 2)), "_orig_mod")  # the flags last as long as igniter_main
