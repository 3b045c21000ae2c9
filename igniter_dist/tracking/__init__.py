"""Where metrics go: console, files, MLflow. Rank 0 gets real sinks; other ranks a null one."""

from .base import NullSink, RunInfo, Sink, Sinks
from .factory import MlflowConfig, build_sinks
from .flags import add_mlflow_flags

__all__ = ["MlflowConfig", "NullSink", "RunInfo", "Sink", "Sinks", "add_mlflow_flags", "build_sinks"]
