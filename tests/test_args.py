"""Flags: explicit booleans, schedules, SageMaker's extra keys, secrets redaction; bad input refused clearly."""

import pytest

from igniter_dist.args import build_parser, parse_args, train_kwargs
from igniter_dist.errors import ConfigError
from igniter_dist.redaction import redact
from igniter_dist.schedule import Every, parse_every
from igniter_dist.tracking.base import RunInfo
from igniter_dist.values import parse_bool


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("false", False), ("False", False), ("0", False), ("no", False)])
def test_booleans_take_explicit_values(text, value):
    assert parse_bool(text) is value
    assert parse_args(build_parser(), ["--resume", text]).resume is value


def test_resume_maybe_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--resume.*'maybe'"):
        parse_args(build_parser(), ["--resume", "maybe"])


def test_negative_batch_size_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--batch-size.*positive"):
        parse_args(build_parser(), ["--batch-size", "-4"])


def test_schedules_parse_epochs_and_steps():
    assert parse_every("2") == Every(2, "epochs")
    assert parse_every("3epochs") == Every(3, "epochs")
    assert parse_every("500steps") == Every(500, "steps")
    assert parse_every("0") == Every(0)
    assert not Every(0).due(10, 1, True)
    assert Every(5, "steps").due(10, 0, False) and not Every(5, "steps").due(11, 0, False)
    assert Every(2).due(0, 4, True) and not Every(2).due(0, 4, False)


def test_sagemaker_keys_are_ignored_and_inputs_get_flags(monkeypatch):
    monkeypatch.setenv("TRAINING_JOB_NAME", "job")  # inside a job only (tests/test_sagemaker_args.py)
    monkeypatch.setenv("SM_CHANNEL_DATA", "/opt/ml/input/data/data")
    p = build_parser(inputs={"data": "data"})
    args = parse_args(p, ["--sagemaker_program", "train.py", "--sagemaker_submit_directory", "s3://b/x",
                          "--max-epochs", "3"])
    assert args.max_epochs == 3 and args.data == "/opt/ml/input/data/data"


def test_unknown_flags_are_refused():
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):
        parse_args(build_parser(), ["--nope", "1"])


def test_train_kwargs_and_callback_flags():
    p = build_parser(argparse_callback=lambda parser: parser.add_argument("--hidden", type=int, default=3))
    args = parse_args(p, ["--max-epochs", "4", "--save-every", "100steps", "--hidden", "7"])
    kw = train_kwargs(args)
    assert kw["max_epochs"] == 4 and kw["save_every"] == Every(100, "steps") and args.hidden == 7
    assert "hidden" not in kw


def test_secret_looking_parameters_are_redacted():
    out = redact({"api_token": "abc", "mlflow_tracking_password": "pw", "aws_secret_access_key": "k",
                  "learning_rate": 0.1, "empty_key": None})
    assert out == {"api_token": "***", "mlflow_tracking_password": "***", "aws_secret_access_key": "***",
                   "learning_rate": 0.1, "empty_key": None}


def test_redaction_happens_once_where_parameters_enter():
    once = redact({"api_token": "abc", "lr": 0.1})
    assert redact(once) is once and RunInfo(params=once).params is once  # ig.train's params reach sinks as is
    assert RunInfo(params={"api_token": "abc", "lr": 0.1}).params == {"api_token": "***", "lr": 0.1}
