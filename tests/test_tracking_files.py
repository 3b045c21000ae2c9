"""FileSink with real files: args.json redacted, metrics.jsonl, one CSV per evaluator, resume-safe appends."""

import csv
import json

from igniter_dist.tracking.base import RunInfo
from igniter_dist.tracking.files import FileSink


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def log_run(out, steps, *, resumed_step=0, params=None, eval_every=10):
    sink = FileSink(out)
    sink.start(RunInfo(params=params or {"lr": 0.1}, output_dir=str(out), resumed_step=resumed_step))
    for step in steps:
        epoch = (step - 1) // 10 + 1
        sink.log_metrics({"train/loss": 1.0 / step}, step, epoch)
        if step % eval_every == 0:
            sink.log_metrics({"eval/loss": 0.5, "eval/accuracy": step / 100, "holdout/f1": 0.25}, step, epoch)
    sink.close("FINISHED")
    return sink


def test_args_json_is_written_redacted(tmp_path):
    FileSink(tmp_path).start(RunInfo(params={"lr": 0.1, "api_token": "hunter2", "mlflow_tracking_password": "pw",
                                             "empty_key": None}))
    args = json.loads((tmp_path / "args.json").read_text())
    assert args == {"lr": 0.1, "api_token": "***", "mlflow_tracking_password": "***", "empty_key": None}
    assert "hunter2" not in (tmp_path / "args.json").read_text()


def test_every_log_call_is_one_json_record_with_step_epoch_and_time(tmp_path):
    sink = log_run(tmp_path, range(1, 21))
    recs = records(tmp_path)
    assert len(recs) == 20 + 2  # one per log call: 20 training records and 2 evaluations
    assert recs[0]["step"] == 1 and recs[0]["epoch"] == 1 and recs[0]["train/loss"] == 1.0
    assert recs[10] == {**recs[10], "step": 10, "epoch": 1, "eval/accuracy": 0.1, "holdout/f1": 0.25}
    assert all(isinstance(r["time"], float) for r in recs)
    assert sorted(sink.paths()) == sorted(str(tmp_path / n) for n in
                                          ("args.json", "metrics.jsonl", "eval.csv", "holdout.csv"))


def test_one_csv_per_evaluator_and_none_for_training(tmp_path):
    log_run(tmp_path, range(1, 31))
    assert not (tmp_path / "train.csv").exists()
    assert header(tmp_path / "eval.csv") == ["step", "epoch", "time", "loss", "accuracy"]
    assert [(r["step"], r["accuracy"]) for r in rows(tmp_path / "eval.csv")] == [
        ("10", "0.1"), ("20", "0.2"), ("30", "0.3")]
    assert [r["f1"] for r in rows(tmp_path / "holdout.csv")] == ["0.25"] * 3


def test_non_finite_values_are_strict_json_nulls(tmp_path):
    sink = FileSink(tmp_path)
    sink.start(RunInfo())
    sink.log_metrics({"train/loss": float("nan"), "train/grad": float("inf")}, 1, 1)
    sink.close("FAILED")
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: 1 / 0) == {
        **records(tmp_path)[0], "train/loss": None, "train/grad": None}


def test_history_is_flushed_at_flush_while_the_run_goes_on(tmp_path):
    sink = FileSink(tmp_path)
    sink.start(RunInfo())
    sink.log_metrics({"train/loss": 1.0, "eval/loss": 2.0}, 1, 1)
    sink.flush()
    assert records(tmp_path)[0]["eval/loss"] == 2.0 and rows(tmp_path / "eval.csv")[0]["loss"] == "2.0"
    sink.close("FINISHED")


def test_a_new_metric_widens_the_csv_header_and_keeps_old_rows(tmp_path):
    sink = FileSink(tmp_path)
    sink.start(RunInfo())
    sink.log_metrics({"eval/loss": 1.0}, 10, 1)
    sink.log_metrics({"eval/loss": 0.5, "eval/accuracy": 0.75}, 20, 2)
    sink.close("FINISHED")
    assert header(tmp_path / "eval.csv") == ["step", "epoch", "time", "loss", "accuracy"]
    assert [(r["loss"], r["accuracy"]) for r in rows(tmp_path / "eval.csv")] == [("1.0", ""), ("0.5", "0.75")]


def test_resume_appends_without_a_second_header_and_drops_steps_logged_after_the_checkpoint(tmp_path):
    log_run(tmp_path, range(1, 26))  # an attempt that checkpointed at step 20, then died at 25
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 26, "epoch"')  # a line torn by the crash
    log_run(tmp_path, range(21, 31), resumed_step=20)
    steps = [r["step"] for r in records(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, 31))  # each step once, in order
    text = (tmp_path / "eval.csv").read_text()
    assert text.count("step,epoch,time") == 1
    assert [r["step"] for r in rows(tmp_path / "eval.csv")] == ["10", "20", "30"]


def test_resume_with_a_new_evaluator_metric_rewrites_the_header_once(tmp_path):
    log_run(tmp_path, range(1, 11))
    sink = FileSink(tmp_path)
    sink.start(RunInfo(resumed_step=10))
    sink.log_metrics({"eval/loss": 0.4, "eval/auroc": 0.9}, 20, 2)
    sink.close("FINISHED")
    assert header(tmp_path / "eval.csv") == ["step", "epoch", "time", "loss", "accuracy", "auroc"]
    assert [(r["step"], r["accuracy"], r["auroc"]) for r in rows(tmp_path / "eval.csv")] == [
        ("10", "0.1", ""), ("20", "", "0.9")]


def test_an_unwritable_folder_warns_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = FileSink(blocker / "out")
    sink.start(RunInfo(params={"lr": 1}))
    sink.log_metrics({"train/loss": 1.0}, 1, 1)
    sink.flush()
    sink.close("FAILED")
    assert sum("metrics history" in r.getMessage() for r in caplog.records) == 1


def test_a_fresh_start_or_an_evaluation_in_the_same_folder_drops_nothing(tmp_path):
    log_run(tmp_path, range(1, 21))
    sink = FileSink(tmp_path)
    sink.start(RunInfo())  # what ig.evaluate does, at step 0
    sink.log_metrics({"eval/accuracy": 0.5}, 0, 0)
    sink.close("FINISHED")
    assert len(records(tmp_path)) == 22 + 1
    assert [r["step"] for r in rows(tmp_path / "eval.csv")] == ["10", "20", "0"]
