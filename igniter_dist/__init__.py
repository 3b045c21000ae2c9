"""igniter-dist: a distributed-first PyTorch training engine.

One script runs as `python train.py`, under `torchrun` and in SageMaker multi-instance jobs:
DDP, sharded data, exact metrics across ranks, sharded checkpoints on any fsspec URL, resume.
"""

from .args import parser_for_docs, train_kwargs
from .data import shard_iterable
from .engine import Engine
from .errors import CheckpointError, ConfigError, IgniterError, StepOutputError
from .main import igniter_main
from .metrics import Metric
from .runtime import Runtime, runtime
from .schedule import Every
from .signals import Interrupted, stop_safe_worker_init
from .spec import RunSpec
from .steps import SchedulerSpec, StepOptions, supervised_eval_step, supervised_step
from .training import evaluate, train
from .wrapping import prepare

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "Engine", "Every", "IgniterError", "Interrupted", "Metric", "RunSpec",
    "Runtime", "SchedulerSpec", "StepOptions", "StepOutputError", "evaluate", "igniter_main", "parser_for_docs",
    "prepare", "runtime", "shard_iterable", "stop_safe_worker_init", "supervised_eval_step", "supervised_step",
    "train", "train_kwargs",
]
