"""SageMaker: the container contract (`contract`), the per-host entrypoint and the job launcher.

The contract's answers for a script are importable from here (`sagemaker.model_dir()`,
`sagemaker.job_name()`, ...). The entrypoint and the launcher are imported only by the
`igniter-dist` command that runs them, and boto3 only when a job is sent, so `import igniter_dist`
stays light.
"""

from __future__ import annotations

from .contract import (
    ResourceConfig,
    channel_dir,
    checkpoint_dir,
    hyperparameters,
    in_sagemaker,
    job_name,
    model_dir,
    output_dir,
    resource_config,
    script_leftovers,
)

__all__ = [
    "ResourceConfig",
    "channel_dir",
    "checkpoint_dir",
    "hyperparameters",
    "in_sagemaker",
    "job_name",
    "model_dir",
    "output_dir",
    "resource_config",
    "script_leftovers",
]
