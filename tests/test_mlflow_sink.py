"""MlflowSink against a real `mlflow server` (sqlite) and the embedded default store, read back with MlflowClient."""

import logging
import uuid

import pytest

from igniter_dist.tracking.base import RunInfo
from igniter_dist.tracking.mlflow_sink import MAX_PARAM_LENGTH, MlflowSink

SINK_LOG = "igniter_dist.tracking.mlflow_sink"


pytestmark = pytest.mark.usefixtures("clean_mlflow_env")


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


def warnings_from_sink(caplog):
    return [r.getMessage() for r in caplog.records if r.name == SINK_LOG and r.levelno >= logging.WARNING]


def log_steps(sink, steps, epoch=1):
    for step in steps:
        sink.log_metrics({"train/loss": 1.0 / step, "eval/accuracy": step / 100}, step, epoch)


def history(c, run_id, key="train/loss"):
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def test_embedded_store_lands_under_the_output_dir(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    (out).mkdir()
    artifact = out / "note.txt"
    artifact.write_text("hello")
    sink = MlflowSink(output_dir=str(out), tags={"world_size": "2"}, system_metrics=False)
    sink.start(RunInfo(params={"lr": 0.1, "api_token": "tok-SECRET", "long": "x" * 10_000}))
    assert sink.run_id
    log_steps(sink, range(1, 11))
    sink.log_artifact(str(artifact))
    sink.set_tag("checkpoint", "file:///ckpt/step_00000010")
    sink.close("FINISHED")

    assert sink.tracking_uri == f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    c = client(sink.tracking_uri)
    assert [r.info.run_id for r in c.search_runs(["0"])] == [sink.run_id]
    run = c.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.params["api_token"] == "***"
    assert len(run.data.params["long"]) == MAX_PARAM_LENGTH and run.data.params["long"].endswith("...")
    assert run.data.tags["world_size"] == "2" and run.data.tags["checkpoint"] == "file:///ckpt/step_00000010"
    assert history(c, sink.run_id) == [(s, 1.0 / s) for s in range(1, 11)]
    assert [a.path for a in c.list_artifacts(sink.run_id)] == ["note.txt"]
    assert run.info.artifact_uri.startswith(str(out / "mlruns" / "artifacts"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing in cwd
    assert warnings_from_sink(caplog) == []


def test_server_run_has_params_tags_metrics_and_artifacts(mlflow_server, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pt").write_bytes(b"weights")
    (tmp_path / "args.json").write_text("{}")
    name = experiment()
    sink = MlflowSink(tracking_uri=mlflow_server, experiment_name=name, run_name="first",
                      tags={"team": "vision"}, output_dir=str(tmp_path), system_metrics=False,
                      history=lambda: [str(tmp_path / "args.json")])
    sink.start(RunInfo(params={f"p{i}": i for i in range(250)} | {"mlflow_tracking_password": "pw-SECRET"},
                       tags={"nodes": "1"}))
    log_steps(sink, range(1, 6))
    sink.log_artifact(str(tmp_path / "model"))
    sink.log_artifact(str(tmp_path / "missing.pt"))  # warned about, never raised
    sink.close("FINISHED")

    c = client(mlflow_server)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [sink.run_id]
    run = runs[0]
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert len(run.data.params) == 251 and run.data.params["p249"] == "249"  # batched past 100 per call
    assert run.data.params["mlflow_tracking_password"] == "***"
    assert "SECRET" not in str(run.data.params) + str(run.data.tags)
    assert run.data.tags["team"] == "vision" and run.data.tags["nodes"] == "1"
    assert "mlflow.source.name" in run.data.tags  # MLflow's own context tags (user, source, git commit)
    assert history(c, sink.run_id, "eval/accuracy") == [(s, s / 100) for s in range(1, 6)]
    assert sorted(a.path for a in c.list_artifacts(sink.run_id)) == ["history", "model"]
    assert [a.path for a in c.list_artifacts(sink.run_id, "model")] == ["model/model.pt"]
    assert [a.path for a in c.list_artifacts(sink.run_id, "history")] == ["history/args.json"]


def test_resume_continues_the_same_run_without_relogging_params(mlflow_server, tmp_path, caplog):
    name = experiment()
    first = MlflowSink(tracking_uri=mlflow_server, experiment_name=name, system_metrics=False)
    first.start(RunInfo(params={"lr": 0.1, "max_epochs": 2}))
    log_steps(first, range(1, 6))
    first.close("KILLED")
    c = client(mlflow_server)
    assert c.get_run(first.run_id).info.status == "KILLED"

    second = MlflowSink(tracking_uri=mlflow_server, experiment_name=name, system_metrics=False)
    second.start(RunInfo(params={"lr": 0.1, "max_epochs": 4, "new_flag": True}, run_id=first.run_id,
                         resumed_step=5, tags={"nodes": "2"}))
    assert second.run_id == first.run_id
    assert c.get_run(first.run_id).info.status == "RUNNING"
    log_steps(second, range(6, 11), epoch=2)
    second.close("FINISHED")

    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "max_epochs": "2", "new_flag": "True"}  # immutable, new one added
    assert run.data.tags["nodes"] == "2"
    assert [s for s, _ in history(c, run.info.run_id)] == list(range(1, 11))
    assert len(c.search_runs([c.get_experiment_by_name(name).experiment_id])) == 1
    assert warnings_from_sink(caplog) == []


def test_failed_status_and_mlflow_environment_variables(mlflow_server, monkeypatch):
    name = experiment()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    sink = MlflowSink(system_metrics=False)
    sink.start(RunInfo())
    sink.close("FAILED")
    c = client(mlflow_server)
    assert c.get_experiment(c.get_run(sink.run_id).info.experiment_id).name == name
    assert c.get_run(sink.run_id).info.status == "FAILED"

    monkeypatch.setenv("MLFLOW_RUN_ID", sink.run_id)  # a run id handed over by the environment
    again = MlflowSink(system_metrics=False)
    again.start(RunInfo())
    assert again.run_id == sink.run_id
    again.close("KILLED")
    assert c.get_run(sink.run_id).info.status == "KILLED"


def test_an_unknown_run_id_starts_a_new_run_with_a_warning(mlflow_server, caplog):
    sink = MlflowSink(tracking_uri=mlflow_server, experiment_name=experiment(), system_metrics=False)
    sink.start(RunInfo(run_id="0" * 32))
    assert sink.run_id and sink.run_id != "0" * 32
    sink.close("FINISHED")
    assert len(warnings_from_sink(caplog)) == 1 and "cannot be continued" in warnings_from_sink(caplog)[0]


def test_system_metrics_are_logged_when_psutil_is_present(mlflow_server, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    sink = MlflowSink(tracking_uri=mlflow_server, experiment_name=experiment())
    sink.start(RunInfo())
    c = client(mlflow_server)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(k.startswith("system/") for k in c.get_run(sink.run_id).data.metrics):
        time.sleep(0.5)
    sink.close("FINISHED")
    assert "system/cpu_utilization_percentage" in c.get_run(sink.run_id).data.metrics


def test_a_store_that_can_never_work_turns_tracking_off_with_one_warning(tmp_path, caplog):
    sink = MlflowSink(tracking_uri="bogus-scheme://nowhere", output_dir=str(tmp_path), system_metrics=False)
    sink.start(RunInfo(params={"lr": 1}))
    log_steps(sink, range(1, 4))
    sink.set_tag("checkpoint", "x")
    sink.flush()
    sink.close("FINISHED")
    assert sink.run_id is None
    assert len(warnings_from_sink(caplog)) == 1 and "off" in warnings_from_sink(caplog)[0]
