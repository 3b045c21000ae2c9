"""The engine with MLflow on: one run per job across SIGTERM and resume, secrets written nowhere, a quiet console."""

import json
import re
import shlex
import uuid
from pathlib import Path

import pytest

from launch import ROOT, check, python, torchrun

WORKER = ROOT / "tests" / "workers" / "tracking_train.py"
PASSWORD, TOKEN = "pw-SECRET-1", "tok-SECRET-2"

pytestmark = pytest.mark.usefixtures("clean_mlflow_env")  # children inherit no MLFLOW_* from the shell


# What MLflow prints by itself at INFO (sqlite migrations, system metrics, experiment creation) or to
# stdout ("View run" links at the end of a server run): none of it reaches the console.
CHATTER = ("INFO mlflow", "INFO alembic", "INFO  [alembic", "Creating initial MLflow database tables",
           "Created experiment", "View run", "View experiment", "Started monitoring system metrics")


def job_args(tmp: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(tmp / "out"), "--checkpoint-dir", str(tmp / "ckpt"),
            "--mlflow-tracking-password", PASSWORD, "--api-token", TOKEN, *extra]


def assert_quiet(result) -> None:
    """No MLflow chatter in the output of either rank (torchrun passes both ranks' streams through)."""
    for line in (result.stdout + result.stderr).splitlines():
        assert not any(c in line for c in CHATTER), line


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
    # A tracking URI alone turns MLflow on: no --mlflow-enable true.
    args = job_args(tmp_path, "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment-name", name)
    first = torchrun(WORKER, [*args, "--interrupt-at", "8"], nproc=2)  # 6 steps per epoch on 2 ranks
    assert first.returncode != 0 and "stopped by SIGTERM" in first.stderr, first.stderr[-3000:]
    c = MlflowClient(mlflow_server)
    experiment = c.get_experiment_by_name(name)
    assert experiment is not None
    experiment_id = experiment.experiment_id
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
        assert_quiet(out)
        assert "mlflow ui" not in out.stderr  # a server has its own UI
    assert_no_secret_in_files(tmp_path)  # args.json, model/args.json, checkpoint manifests, CSVs


def test_default_store_is_under_the_output_dir_and_rank_zero_says_how_to_browse_it(tmp_path):
    from mlflow import MlflowClient

    result = check(torchrun(WORKER, job_args(tmp_path, "--mlflow-enable", "true", "--max-epochs", "1"),
                            nproc=2, cwd=tmp_path))
    store = tmp_path / "out" / "mlruns" / "mlflow.db"
    assert store.exists() and not (tmp_path / "mlruns").exists()
    commands = re.findall(r"mlflow ui --backend-store-uri (.+)$", result.stderr, re.MULTILINE)
    assert len(commands) == 1, result.stderr  # once, from rank 0
    [uri] = shlex.split(commands[0])
    assert uri == f"sqlite:///{store}"
    c = MlflowClient(uri)  # what the printed command opens
    [run] = c.search_runs(["0"])
    assert f"MLflow run {run.info.run_id} is in the local store" in result.stderr
    assert run.info.status == "FINISHED" and run.data.params["api_token"] == "***"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "eval/loss")] == [6]
    assert "model.pt" in {a.path for a in c.list_artifacts(run.info.run_id)}
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "out" / "mlruns")
    assert TOKEN not in result.stdout + result.stderr
    assert_quiet(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch 1/1 step {s}" for s in (2, 4, 6, 6)]
    for line in lines[:3]:  # training: the loss, the learning rate, one rate; throughput is in the files
        assert re.fullmatch(r"epoch 1/1 step \d \| train/loss [0-9.]+ \| lr 0\.01 \| [0-9.]+ it/s", line), line
    assert "train/samples_per_s" in jsonl(tmp_path / "out" / "metrics.jsonl")[0]
    assert_no_secret_in_files(tmp_path)


@pytest.mark.parametrize("flag", ["--mlflow-experiment-name", "--mlflow-run-name"])
def test_mlflow_names_without_enable_or_uri_exit_2_with_one_line(tmp_path, flag):
    result = python(WORKER, ["--output-dir", str(tmp_path), flag, "x"])
    assert result.returncode == 2
    assert f"{flag} is set but MLflow is off; add --mlflow-enable true (or --mlflow-tracking-uri)" in result.stderr
