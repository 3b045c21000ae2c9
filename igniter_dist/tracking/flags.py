"""The `--mlflow-*` command-line flags; `MlflowConfig.from_args` reads them back."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Options, option
from ..values import parse_bool, parse_tags


@dataclass(frozen=True)
class MlflowFlags(Options):
    """The "mlflow" group of the standard flags."""

    mlflow_enable: bool | None = option(
        None, group="mlflow", parse=parse_bool,
        help="Log parameters, metrics and artifacts to MLflow from rank 0 "
             "(default store: <output-dir>/mlruns/mlflow.db, opened by `mlflow ui`). "
             "Unset: on when --mlflow-tracking-uri is given, else off; false: off.")
    mlflow_tracking_uri: str | None = option(
        None, group="mlflow",
        help="Tracking server or store URI, such as http://host:5000 "
             "(default: MLFLOW_TRACKING_URI, else the local store under --output-dir).")
    mlflow_experiment_name: str | None = option(
        None, group="mlflow",
        help="Experiment to log into, created if missing (default: MLFLOW_EXPERIMENT_NAME, else Default).")
    mlflow_run_name: str | None = option(
        None, group="mlflow", help="Name of the run (default: the SageMaker job name, else a name MLflow picks).")
    mlflow_tags: dict[str, str] = option(
        group="mlflow", parse=parse_tags, default_factory=dict,
        help="Extra run tags as key=value pairs separated by commas (team=vision,stage=dev).")
    mlflow_tracking_username: str | None = option(
        None, group="mlflow",
        help="User name for a server with authentication (default: MLFLOW_TRACKING_USERNAME).")
    mlflow_tracking_password: str | None = option(
        None, group="mlflow",
        help="Password for a server with authentication (default: MLFLOW_TRACKING_PASSWORD); never logged.")
