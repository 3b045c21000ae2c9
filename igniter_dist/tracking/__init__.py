"""Where metrics go: console, files, MLflow. Rank 0 gets real sinks; other ranks a null one."""

from .base import NullSink, RunInfo, Sink, Sinks
from .factory import MlflowConfig, build_sinks
from .flags import MlflowFlags

__all__ = ["MlflowConfig", "MlflowFlags", "NullSink", "RunInfo", "Sink", "Sinks", "build_sinks"]
