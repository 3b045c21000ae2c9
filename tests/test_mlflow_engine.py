"""The engine with MLflow on: one run per job across SIGTERM and resume, and secrets written nowhere."""

import json
import uuid
from pathlib import Path

import pytest

from launch import ROOT, check, python, torchrun

WORKER = ROOT / "tests" / "workers" / "tracking_train.py"
PASSWORD, TOKEN = "pw-SECRET-1", "tok-SECRET-2"

pytestmark = pytest.mark.usefixtures("clean_mlflow_env")  # children inherit no MLFLOW_* from the shell


def job_args(tmp: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(tmp / "out"), "--checkpoint-dir", str(tmp / "ckpt"), "--mlflow-enable", "true",
            "--mlflow-tracking-password", PASSWORD, "--api-token", TOKEN, *extra]


def steps_of(records: list[dict], key: str) -> list[int]:
    return [r["step"] for r in records if key in r]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_secret_in_files(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".db"):  # the sqlite store is checked through MLflow
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and TOKEN.encode() not in data, path


def test_two_ranks_sigterm_then_resume_continue_one_run_with_its_whole_history(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    name = f"engine-{uuid.uuid4().hex[:8]}"
    args = job_args(tmp_path, "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment-name", name)
    first = torchrun(WORKER, [*args, "--interrupt-at", "8"], nproc=2)  # 6 steps per epoch on 2 ranks
    assert first.returncode != 0 and "stopped by SIGTERM" in first.stderr, first.stderr[-3000:]
    c = MlflowClient(mlflow_server)
    experiment_id = c.get_experiment_by_name(name).experiment_id
    [killed] = c.search_runs([experiment_id])
    assert killed.info.status == "KILLED"
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))[-1]  # step 8, or 9 if ranks agreed later
    assert killed.data.tags["checkpoint"].endswith(saved)

    second = check(torchrun(WORKER, args, nproc=2))
    [run] = c.search_runs([experiment_id])  # exactly one run for the job
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.params["api_token"] == "***" and run.data.params["mlflow_tracking_password"] == "***"
    assert PASSWORD not in str(run.data.params) + str(run.data.tags)
    assert TOKEN not in str(run.data.params) + str(run.data.tags)
    assert "rejected" not in second.stderr  # params were not re-logged

    history = jsonl(tmp_path / "out" / "metrics.jsonl")
    for key in ("train/loss", "eval/loss"):
        tracked = [m.step for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]
        assert tracked == steps_of(history, key), key  # the same, complete history in both places
        assert tracked == sorted(set(tracked)), key  # steps only grow, each once
    assert steps_of(history, "train/loss")[-1] == 18 and steps_of(history, "eval/loss") == [6, 12, 18]
    assert any(s < 8 for s in steps_of(history, "train/loss")) and any(s > 8 for s in steps_of(history, "train/loss"))

    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"model.pt", "args.json", "history"} <= artifacts
    assert {a.path for a in c.list_artifacts(run.info.run_id, "history")} >= {"history/metrics.jsonl",
                                                                              "history/eval.csv"}
    for out in (first, second):
        assert PASSWORD not in out.stdout + out.stderr and TOKEN not in out.stdout + out.stderr
    assert_no_secret_in_files(tmp_path)  # args.json, model/args.json, checkpoint manifests, CSVs


def test_single_process_default_store_is_under_the_output_dir(tmp_path):
    from mlflow import MlflowClient

    result = check(python(WORKER, job_args(tmp_path, "--max-epochs", "1"), cwd=tmp_path))
    store = tmp_path / "out" / "mlruns" / "mlflow.db"
    assert store.exists() and not (tmp_path / "mlruns").exists()
    c = MlflowClient(f"sqlite:///{store}")
    [run] = c.search_runs(["0"])
    assert run.info.status == "FINISHED" and run.data.params["api_token"] == "***"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "eval/loss")] == [12]
    assert "model.pt" in {a.path for a in c.list_artifacts(run.info.run_id)}
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "out" / "mlruns")
    assert TOKEN not in result.stdout + result.stderr
    assert_no_secret_in_files(tmp_path)


@pytest.mark.parametrize("flag", ["--mlflow-tracking-uri", "--mlflow-experiment-name"])
def test_mlflow_settings_without_enable_exit_2_with_one_line(tmp_path, flag):
    result = python(WORKER, ["--output-dir", str(tmp_path), flag, "x"])
    assert result.returncode == 2
    assert f"{flag} is set but MLflow is off; add --mlflow-enable true" in result.stderr
