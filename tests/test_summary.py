"""The closing summary: what it reports from the calls the engine makes on its sinks."""

import io

from igniter_dist.checkpoint.retention import parse_keep_best
from igniter_dist.tracking.base import NullSink, Progress, RunInfo
from igniter_dist.tracking.summary import SummarySink, wall_time


def test_summary_reports_last_and_best_evaluation_model_checkpoint_and_mlflow_run():
    tracking = NullSink()
    tracking.run_id = "0123abcd"  # what MLflow's sink reports once its run exists
    out = io.StringIO()
    sink = SummarySink(tracking, parse_keep_best("eval/accuracy:max"), stream=out)
    sink.start(RunInfo(resumed_step=90))
    for step, epoch, accuracy in [(135, 3, 0.91), (180, 4, 0.94), (225, 5, 0.93)]:
        sink.progress(Progress(step=step, epoch=epoch, iteration=45, epoch_length=45, max_epochs=5))
        sink.log_metrics({"train/loss": 0.2, "train/lr/optimizer": 3e-4}, step, epoch)  # not an evaluation
        sink.log_metrics({"eval/loss": 0.25, "eval/accuracy": accuracy}, step, epoch)
        sink.set_tag("checkpoint", f"s3://bucket/run/checkpoints/step_{step:010d}")
    sink.log_artifact("runs/a/model/model.pt")
    sink.log_artifact("runs/a/model/model.safetensors")
    sink.log_artifact("runs/a/model/args.json")
    sink.close("FINISHED")
    headline, *rest = out.getvalue().splitlines()
    assert headline.startswith("igniter-dist: finished in ")
    assert headline.endswith(" s at step 225, 135 in this run, epoch 5/5")
    assert rest == [
        "  last evaluation: eval/loss 0.25 eval/accuracy 0.93",
        "  best eval/accuracy: 0.94 at step 180",
        "  model: runs/a/model/model.pt",
        "  latest checkpoint: s3://bucket/run/checkpoints/step_0000000225",
        "  MLflow run: 0123abcd",
    ]


def test_best_by_min_and_a_failed_run_left_to_its_error():
    out = io.StringIO()
    sink = SummarySink(NullSink(), parse_keep_best("eval/loss:min"), stream=out)
    sink.start(RunInfo())
    sink.log_metrics({"eval/loss": 0.5}, 10, 1)
    sink.log_metrics({"eval/loss": 0.4}, 20, 2)
    sink.log_metrics({"eval/loss": 0.45}, 30, 3)
    assert sink.lines("KILLED")[1:] == ["  last evaluation: eval/loss 0.45", "  best eval/loss: 0.4 at step 20"]
    sink.close("FAILED")
    assert out.getvalue() == ""


def test_wall_time_reads_as_people_say_it():
    assert [wall_time(s) for s in (8.44, 187, 7500)] == ["8.4 s", "3 min 07 s", "2 h 05 min"]
