"""The `--mlflow-*` command-line flags; `MlflowConfig.from_args` reads them back."""

from __future__ import annotations

import argparse

from ..values import parse_bool, parse_tags


def add_mlflow_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "mlflow" argument group to `parser` and return it."""
    g = parser.add_argument_group("mlflow")
    g.add_argument("--mlflow-enable", type=parse_bool, default=None,
                   help="Log parameters, metrics and artifacts to MLflow from rank 0 "
                        "(default store: <output-dir>/mlruns/mlflow.db, opened by `mlflow ui`). "
                        "Unset: on when --mlflow-tracking-uri is given, else off; false: off.")
    g.add_argument("--mlflow-tracking-uri", default=None,
                   help="Tracking server or store URI, such as http://host:5000 "
                        "(default: MLFLOW_TRACKING_URI, else the local store under --output-dir).")
    g.add_argument("--mlflow-experiment-name", default=None,
                   help="Experiment to log into, created if missing (default: MLFLOW_EXPERIMENT_NAME, else Default).")
    g.add_argument("--mlflow-run-name", default=None,
                   help="Name of the run (default: the SageMaker job name, else a name MLflow picks).")
    g.add_argument("--mlflow-tags", type=parse_tags, default={},
                   help="Extra run tags as key=value pairs separated by commas (team=vision,stage=dev).")
    g.add_argument("--mlflow-tracking-username", default=None,
                   help="User name for a server with authentication (default: MLFLOW_TRACKING_USERNAME).")
    g.add_argument("--mlflow-tracking-password", default=None,
                   help="Password for a server with authentication (default: MLFLOW_TRACKING_PASSWORD); "
                        "never logged.")
    return g
