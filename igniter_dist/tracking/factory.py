"""Assemble the sinks of this process: console, files and MLflow on rank 0, a null sink elsewhere."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import sagemaker
from ..errors import ConfigError
from ..runtime import Runtime
from .base import NullSink, Sink, Sinks
from .summary import SummarySink

if TYPE_CHECKING:
    from ..checkpoint.retention import KeepBest


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow settings from the `--mlflow-*` flags; unset values fall back to MLflow's own variables."""

    enable: bool = False
    tracking_uri: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MlflowConfig:
        """Read the `MlflowFlags` flags; a namespace without them gives a disabled config.

        `--mlflow-enable` left unset follows `--mlflow-tracking-uri`: a URI turns MLflow on. An explicit
        `--mlflow-enable false` turns it off whatever else is set.

        Raises:
            ConfigError: an experiment or run name is set while MLflow is neither enabled nor given a URI.
        """
        tracking_uri = getattr(args, "mlflow_tracking_uri", None) or None
        enable = getattr(args, "mlflow_enable", None)
        config = cls(
            enable=bool(tracking_uri) if enable is None else bool(enable),
            tracking_uri=tracking_uri,
            experiment_name=getattr(args, "mlflow_experiment_name", None) or None,
            run_name=getattr(args, "mlflow_run_name", None) or None,
            tags=dict(getattr(args, "mlflow_tags", None) or {}),
            username=getattr(args, "mlflow_tracking_username", None) or None,
            password=getattr(args, "mlflow_tracking_password", None) or None,
        )
        if enable is None and not config.enable:
            given = [flag for flag, value in (("--mlflow-experiment-name", config.experiment_name),
                                              ("--mlflow-run-name", config.run_name)) if value]
            if given:
                raise ConfigError(f"{given[0]} is set but MLflow is off; add --mlflow-enable true "
                                  f"(or --mlflow-tracking-uri) or drop {given[0]}.")
        return config


def build_sinks(runtime: Runtime, *, output_dir: str | None, console: bool = True,
                mlflow: MlflowConfig | None = None, summary: bool = False, best: KeepBest | None = None) -> Sink:
    """The sinks of this process: `Sinks([...])` on rank 0, `NullSink()` on every other rank.

    With `console` and `summary`, the run ends with a closing summary that reports `best`'s best value.

    Raises:
        ConfigError: `output_dir` is a URL, or MLflow is enabled without the mlflow package.
    """
    if not runtime.is_main:
        return NullSink()  # other ranks never print, write history or import mlflow
    from .console import ConsoleSink
    from .files import FileSink

    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink())
    files: FileSink | None = None
    if output_dir:
        if "://" in output_dir:
            raise ConfigError(f"--output-dir must be a local folder, got {output_dir!r}; "
                              "put checkpoints on remote storage with --checkpoint-dir instead.")
        files = FileSink(output_dir)
        sinks.append(files)
    if mlflow is not None and mlflow.enable:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("--mlflow-enable true needs the mlflow package; "
                              "install it with pip install 'igniter-dist[mlflow]'.")
        from .mlflow_sink import MlflowSink

        sinks.append(MlflowSink(
            tracking_uri=mlflow.tracking_uri,
            experiment_name=mlflow.experiment_name,
            run_name=mlflow.run_name or sagemaker.job_name(),
            tags={**run_tags(runtime), **mlflow.tags},
            username=mlflow.username,
            password=mlflow.password,
            output_dir=output_dir,
            history=files.paths if files is not None else None,
        ))
    fan_out = Sinks(sinks)
    if console and summary:
        sinks.append(SummarySink(fan_out, best))  # last: it closes after MLflow has its run id and final say
    return fan_out


def run_tags(runtime: Runtime) -> dict[str, str]:
    """Tags that describe where a run trains (the engine's RunInfo.tags may repeat them)."""
    tags = {
        "world_size": str(runtime.world_size),
        "nodes": str(runtime.num_nodes),
        "device": runtime.device.type,
        "environment": runtime.kind,
        "torch": torch.__version__,
    }
    job = sagemaker.job_name()
    if job:
        tags["sagemaker_job"] = job
    return tags

