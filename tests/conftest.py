"""Shared test set-up. Server fixtures live in their own plugin modules, listed here."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import final_reports

from launch import ROOT, check, torchrun

sys.path.insert(0, os.path.dirname(__file__))
# Tests that share a worker's model import the worker as a module, by the name mypy gives it too.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))

# Each plugin module owns one real server (moto S3, mlflow) or one family of fixtures.
pytest_plugins = [name for name in ("fixtures_s3", "fixtures_mlflow")
                  if os.path.exists(os.path.join(os.path.dirname(__file__), f"{name}.py"))]


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores are shared by every process a test starts: one intra-op thread each keeps
    # torchrun tests from oversubscribing the machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> str:
    """The digest of the resume probe's uninterrupted 2-rank run (tests/workers/resume_probe.py, its defaults):
    what every interrupted and resumed run of it must end with, bitwise."""
    tmp = tmp_path_factory.mktemp("reference")
    check(torchrun(ROOT / "tests" / "workers" / "resume_probe.py",
                   ["--report-dir", str(tmp / "r"), "--checkpoint-dir", str(tmp / "ckpt"), "--output-dir",
                    str(tmp / "out")]))
    reports = final_reports(tmp / "r")
    assert len(reports) == 2 and reports[0]["digest"] == reports[1]["digest"]
    return reports[0]["digest"]
