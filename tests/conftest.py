"""Shared test set-up. Server fixtures live in their own plugin modules, listed here."""

from __future__ import annotations

import os
import sys

import pytest

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
