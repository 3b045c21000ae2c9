"""Inside a SageMaker training job: the container contract (SM_* variables, /opt/ml files).

Nothing here imports the sagemaker SDK; the launcher lives in `igniter_dist.launcher`.
"""

from __future__ import annotations

import os


def in_sagemaker() -> bool:
    """True inside a SageMaker training container (toolkit variables or the job name)."""
    return bool(os.environ.get("SM_CURRENT_HOST") or os.environ.get("TRAINING_JOB_NAME"))


def model_dir() -> str | None:
    """Where SageMaker uploads the model from (SM_MODEL_DIR), inside a job."""
    return os.environ.get("SM_MODEL_DIR")


def output_dir() -> str | None:
    """Where SageMaker uploads other outputs from (SM_OUTPUT_DATA_DIR), inside a job."""
    return os.environ.get("SM_OUTPUT_DATA_DIR")


def channel_dir(name: str) -> str | None:
    """The local folder of input channel `name` (SM_CHANNEL_<NAME>), inside a job."""
    return os.environ.get(f"SM_CHANNEL_{name.upper()}")
