"""Flags: explicit booleans, schedules, SageMaker's extra keys, secrets redaction; bad input refused clearly."""

import pytest
import torch

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


def test_help_shows_each_default_once_booleans_as_true_false_and_the_exit_codes(monkeypatch):
    from igniter_dist.errors import SCRIPT_EXIT_CODES

    monkeypatch.setenv("COLUMNS", "250")  # no wrapping: one line per option
    text = build_parser(inputs={"data": "data"}).format_help()
    for option in text.split("\n  --")[1:]:  # one chunk per option
        assert option.count("(default") <= 1, option
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: {})" not in text
    assert "--resume {true,false}" in text and "Resume from the latest" in text and "(default: true)" in text
    assert "Evaluation batch size per process (default: --batch-size).\n" in text
    assert "Resume from the latest committed checkpoint in --checkpoint-dir (default: true).\n" in text
    epilog = text[text.index("exit codes:"):]
    assert [line.split()[0] for line in epilog.splitlines()[1:] if not line.startswith("     ")] == \
        [c.code.split()[0] for c in SCRIPT_EXIT_CODES]


def test_a_count_that_is_not_a_number_says_what_the_flag_takes():
    with pytest.raises(ConfigError, match=r"^argument --max-epochs: must be a positive integer, got 'abc'\."):
        parse_args(build_parser(), ["--max-epochs", "abc"])
    with pytest.raises(ConfigError, match=r"^--n-saved must be a positive integer, got 'two'\.$"):
        from igniter_dist.options import from_keywords
        from igniter_dist.training import TrainOptions

        from_keywords("ig.train", {"n_saved": "two"}, TrainOptions)


def _exit_of(capsys, *argv: str, **keywords) -> tuple[object, str, dict]:
    import igniter_dist as ig

    seen: dict = {}

    def main(args):
        seen["device"] = args.device
        seen["tensor"] = torch.zeros(1).to(args.device)

    with pytest.raises(SystemExit) as exit_:
        ig.igniter_main(main, argv=list(argv), **keywords)
    return exit_.value.code, capsys.readouterr().err, seen


def test_args_device_is_the_resolved_device(capsys):
    code, _, seen = _exit_of(capsys, "--device", "auto")
    assert code == 0 and seen["device"] == "cpu" and seen["tensor"].device == torch.device("cpu")


def test_an_unknown_flag_for_the_script_is_a_usage_error(capsys):
    code, err, seen = _exit_of(capsys, "--hiden", "3")
    assert code == 2 and not seen
    assert err == "error: unrecognized arguments: --hiden 3. Run with --help for the list of flags.\n"


@pytest.mark.parametrize("keyword,replacement", [
    ("training_args", "set flag defaults in argparse_callback with parser.set_defaults(max_epochs=..., ...)"),
    ("checkpoint_dir", "set that flag's default in argparse_callback with parser.set_defaults(checkpoint_dir=...)"),
    ("training_instance", "launch SageMaker jobs with `igniter-dist launch sagemaker SCRIPT --instance-type TYPE ...`"),
])
def test_pytorch_igniter_keywords_name_their_replacement(capsys, keyword, replacement):
    code, err, seen = _exit_of(capsys, **{keyword: {"max_epochs": 5}})
    assert code == 2 and not seen
    assert err == (f"error: igniter_main() no longer takes {keyword}= (a pytorch-igniter keyword): {replacement}; "
                   "see docs/howto/migrating.md.\n")
    code, err, _ = _exit_of(capsys, bogus=1)
    assert code == 2 and err == ("error: igniter_main() got an unknown keyword 'bogus'; it takes main, inputs, "
                                 "argparse_callback, description and argv.\n")
