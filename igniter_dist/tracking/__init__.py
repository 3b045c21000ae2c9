"""Where metrics go: console, files, MLflow. Rank 0 gets real sinks; other ranks a null one."""

from .base import NullSink, RunInfo, Sink, Sinks

__all__ = ["NullSink", "RunInfo", "Sink", "Sinks"]
