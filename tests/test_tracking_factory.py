"""build_sinks, MlflowConfig and the --mlflow-* flags; rank 0 alone imports mlflow and logs."""

import argparse
import json
import subprocess
import sys
import uuid

import pytest

from igniter_dist.args import build_parser, parse_args
from igniter_dist.errors import ConfigError
from igniter_dist.runtime import Runtime
from igniter_dist.tracking.base import NullSink, Progress, RunInfo, Sinks
from igniter_dist.tracking.console import format_value
from igniter_dist.tracking.factory import MlflowConfig, build_sinks
from launch import ROOT, check, torchrun

WORKER = ROOT / "tests" / "workers" / "tracking_ranks.py"


def config_of(*argv):
    return MlflowConfig.from_args(parse_args(build_parser(), list(argv)))


def test_flags_become_a_config():
    c = config_of("--mlflow-enable", "True", "--mlflow-tracking-uri", "http://mlflow:5000",
                  "--mlflow-experiment-name", "digits", "--mlflow-run-name", "try-1",
                  "--mlflow-tags", "team=vision, stage=dev", "--mlflow-tracking-username", "ann",
                  "--mlflow-tracking-password", "pw-SECRET")
    assert c == MlflowConfig(enable=True, tracking_uri="http://mlflow:5000", experiment_name="digits",
                             run_name="try-1", tags={"team": "vision", "stage": "dev"}, username="ann",
                             password="pw-SECRET")
    assert "pw-SECRET" not in repr(c)


def test_mlflow_is_off_by_default_a_tracking_uri_turns_it_on_and_an_explicit_false_wins():
    assert config_of() == MlflowConfig()
    assert MlflowConfig.from_args(argparse.Namespace()) == MlflowConfig()  # a namespace without the flags
    assert config_of("--mlflow-tracking-uri", "http://mlflow:5000") == MlflowConfig(
        enable=True, tracking_uri="http://mlflow:5000")
    assert not config_of("--mlflow-enable", "false", "--mlflow-tracking-uri", "http://mlflow:5000").enable
    assert not config_of("--mlflow-enable", "False", "--mlflow-experiment-name", "digits").enable
    with pytest.raises(ConfigError, match="--mlflow-experiment-name is set but MLflow is off; add --mlflow-enable "
                                          r"true \(or --mlflow-tracking-uri\) or drop --mlflow-experiment-name\."):
        config_of("--mlflow-experiment-name", "digits")
    with pytest.raises(ConfigError, match="expected true or false"):
        config_of("--mlflow-enable", "maybe")


def test_other_ranks_get_a_null_sink():
    assert type(build_sinks(Runtime(rank=1, world_size=2), output_dir="out",
                            mlflow=MlflowConfig(enable=True))) is NullSink


def test_an_output_url_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--output-dir must be a local folder"):
        build_sinks(Runtime(), output_dir="s3://bucket/out")


def test_rank_zero_fans_out_to_console_files_and_mlflow_with_history_uploaded(tmp_path, mlflow_server, capsys,
                                                                             clean_mlflow_env):
    name = f"factory-{uuid.uuid4().hex[:8]}"
    sinks = build_sinks(Runtime(), output_dir=str(tmp_path), mlflow=MlflowConfig(
        enable=True, tracking_uri=mlflow_server, experiment_name=name, tags={"team": "vision"}))
    assert isinstance(sinks, Sinks) and [type(s).__name__ for s in sinks.sinks] == ["ConsoleSink", "FileSink",
                                                                                   "MlflowSink"]
    sinks.start(RunInfo(params={"lr": 0.1, "api_token": "tok-SECRET"}, output_dir=str(tmp_path)))
    for step in range(1, 5):
        sinks.progress(Progress(step=step, epoch=1, iteration=step, epoch_length=4, max_epochs=1))
    sinks.log_metrics({"train/loss": 0.5}, 4, 1)
    sinks.log_metrics({"eval/accuracy": 0.75}, 4, 1)
    run_id = sinks.run_id
    sinks.close("FINISHED")
    assert run_id is not None

    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    run = c.get_run(run_id)
    assert run.data.params["api_token"] == "***" and run.data.tags["team"] == "vision"
    assert run.data.tags["world_size"] == "1" and run.data.tags["device"] == "cpu" and "torch" in run.data.tags
    assert sorted(a.path for a in c.list_artifacts(run_id, "history")) == [
        "history/args.json", "history/eval.csv", "history/metrics.jsonl"]
    assert json.loads((tmp_path / "args.json").read_text())["api_token"] == "***"
    out = capsys.readouterr().out
    assert "epoch 1/1 step 4 | eval/accuracy 0.75" in out and "SECRET" not in out


def test_import_and_other_ranks_never_import_mlflow():
    code = ("import sys, igniter_dist\n"
            "from igniter_dist.runtime import Runtime\n"
            "from igniter_dist.tracking.factory import MlflowConfig, build_sinks\n"
            "s = build_sinks(Runtime(rank=1, world_size=2), output_dir='out', mlflow=MlflowConfig(enable=True))\n"
            "s.start(None); s.log_metrics({'a': 1.0}, 1, 1); s.close('FINISHED')\n"
            "print([m for m in sys.modules if m.split('.')[0] == 'mlflow'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_two_ranks_print_log_and_track_from_rank_zero_only(tmp_path, mlflow_server):
    name = f"ranks-{uuid.uuid4().hex[:8]}"
    result = check(torchrun(WORKER, ["--output-dir", str(tmp_path / "out"), "--report-dir", str(tmp_path / "r"),
                                     "--tracking-uri", mlflow_server, "--experiment", name], nproc=2))
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3, result.stdout  # one line per interval, from rank 0 only
    for line, step in zip(lines, (10, 20, 30), strict=True):
        assert line.startswith(f"epoch 1/1 step {step} | train/loss {format_value(1 / step)} | ")
    r0, r1 = (json.loads((tmp_path / "r" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["mlflow_imported"] and not r1["mlflow_imported"]
    assert r0["run_id"] and r1["run_id"] == r0["run_id"]  # broadcast from rank 0

    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    experiment = c.get_experiment_by_name(name)
    assert experiment is not None
    runs = c.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [r0["run_id"]]
    assert [m.step for m in c.get_metric_history(r0["run_id"], "train/loss")] == [10, 20, 30]
    assert runs[0].data.tags["world_size"] == "2"
    history = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [10, 20, 30]  # one writer


def test_run_tags_name_the_sagemaker_job(monkeypatch):
    from igniter_dist.tracking.factory import run_tags

    monkeypatch.setenv("TRAINING_JOB_NAME", "digits-2026-11-28")
    tags = run_tags(Runtime(world_size=4, local_world_size=2, rank=0, kind="sagemaker"))
    assert tags["sagemaker_job"] == "digits-2026-11-28"
    assert (tags["world_size"], tags["nodes"], tags["environment"]) == ("4", "2", "sagemaker")
