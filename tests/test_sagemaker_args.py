"""SageMaker's own `--sagemaker_*` keys are ignored inside a job only; pytorch-igniter's `--sagemaker-*`
flags are refused with what replaces them, inside a job and out."""

from __future__ import annotations

import os

import pytest
from test_sagemaker_entrypoint import layout

from igniter_dist.args import build_parser, parse_args
from igniter_dist.errors import ConfigError
from launch import ROOT, python

LAUNCH = "`igniter-dist launch sagemaker SCRIPT [OPTIONS] [-- SCRIPT_ARGS]`"
OLD_FLAG = ("--sagemaker-run is a pytorch-igniter flag that igniter-dist does not take: "
            f"launch SageMaker jobs with {LAUNCH}.")
JOB_KEY = ("--sagemaker_program is one of SageMaker's own hyperparameters, ignored only inside a training job; "
           f"drop it here, or launch a job with {LAUNCH}.")


@pytest.fixture
def outside(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SM_") or k == "TRAINING_JOB_NAME"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))  # an empty /opt/ml: no config files


@pytest.fixture
def inside(tmp_path, monkeypatch):
    """A job as a bring-your-own container sees it: the /opt/ml files, no SM_* variables."""
    for key in [k for k in os.environ if k.startswith("SM_") or k == "TRAINING_JOB_NAME"]:
        monkeypatch.delenv(key)
    base = layout(tmp_path / "ml", "algo-1", ["algo-1"], {"sagemaker_program": "train.py"})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))


def test_inside_a_job_sagemaker_keys_are_ignored(inside):
    args = parse_args(build_parser(), ["--sagemaker_program", "train.py", "--max-epochs", "3",
                                       "--sagemaker_region=us-east-1", "--sagemaker_job_name", "digits-1"])
    assert args.max_epochs == 3
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):
        parse_args(build_parser(), ["--sagemaker_program", "train.py", "--nope", "1"])


def test_inside_a_job_pytorch_igniter_flags_are_still_refused(inside):
    with pytest.raises(ConfigError) as e:
        parse_args(build_parser(), ["--sagemaker-run", "true", "--max-epochs", "3"])
    assert str(e.value) == OLD_FLAG


@pytest.mark.parametrize("argv, message", [
    (["--sagemaker-run", "true", "--max-epochs", "3"], OLD_FLAG),
    (["--max-epochs", "3", "--sagemaker-run=yes"], OLD_FLAG),
    (["--sagemaker-instance-type", "ml.g5.xlarge"], OLD_FLAG.replace("--sagemaker-run", "--sagemaker-instance-type")),
    (["--sagemaker_program", "train.py"], JOB_KEY),
])
def test_outside_a_job_sagemaker_flags_say_what_replaces_them(outside, argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(build_parser(), argv)
    assert str(e.value) == message


def test_a_script_exits_2_with_one_sentence(tmp_path):
    env = {"SAGEMAKER_BASE_DIR": str(tmp_path), "TRAINING_JOB_NAME": ""}
    result = python(ROOT / "examples" / "digits" / "train.py", ["--sagemaker-run", "true", "--max-epochs", "1",
                                                                "--output-dir", str(tmp_path / "out")], env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == f"error: {OLD_FLAG}"
    assert not (tmp_path / "out").exists()  # refused before anything started
