"""ConsoleSink: plain lines when stdout is not a terminal, a tqdm bar when it is; readable numbers."""

import io
import re

import pytest

from igniter_dist.tracking.base import Progress, RunInfo
from igniter_dist.tracking.console import ConsoleSink, format_value


@pytest.mark.parametrize("value, text", [
    (0.341234, "0.3412"), (0.91, "0.91"), (1.0, "1"), (0.0, "0"), (150.0, "150"), (12.3456, "12.35"),
    (23456.7, "23457"), (3e-4, "0.0003"), (1.234e-6, "1.234e-06"), (float("nan"), "nan"), (float("inf"), "inf"),
    (-2.5, "-2.5"),
])
def test_numbers_read_well(value, text):
    assert format_value(value) == text


def run_epochs(sink, epochs=2, epoch_length=10, log_every=5):
    sink.start(RunInfo())
    for epoch in range(1, epochs + 1):
        for it in range(1, epoch_length + 1):
            step = (epoch - 1) * epoch_length + it
            sink.progress(Progress(step=step, epoch=epoch, iteration=it, epoch_length=epoch_length,
                                   max_epochs=epochs))
            if step % log_every == 0:
                sink.log_metrics({"train/loss": 1.0 / step, "train/accuracy": 0.5}, step, epoch)
        sink.log_metrics({"eval/loss": 0.25, "eval/accuracy": 0.875}, epoch * epoch_length, epoch)
    sink.close("FINISHED")


def test_not_a_terminal_prints_one_line_per_log_call_and_nothing_per_step():
    out = io.StringIO()  # StringIO.isatty() is False: the SageMaker / CloudWatch case
    run_epochs(ConsoleSink(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 * 2 + 2  # two training intervals and one evaluation per epoch
    assert re.fullmatch(r"epoch 1/2 step 5 \| train/loss 0\.2 train/accuracy 0\.5 \| [0-9.e+]+ it/s", lines[0])
    assert lines[2] == "epoch 1/2 step 10 | eval/loss 0.25 eval/accuracy 0.875"  # no new steps: no rate
    assert lines[3].startswith("epoch 2/2 step 15 | train/loss 0.06667 train/accuracy 0.5 | ")
    assert lines[-1] == "epoch 2/2 step 20 | eval/loss 0.25 eval/accuracy 0.875"


def test_lines_before_any_step_still_say_where_they_are():
    out = io.StringIO()
    sink = ConsoleSink(out)
    sink.start(RunInfo())
    sink.log_metrics({"eval/accuracy": 0.5}, 0, 0)
    assert out.getvalue() == "epoch 0 step 0 | eval/accuracy 0.5\n"


def test_terminal_shows_a_bar_per_epoch_with_metrics_and_keeps_evaluations_as_lines():
    out = io.StringIO()
    run_epochs(ConsoleSink(out, terminal=True))
    text = out.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "10/10" in text  # the bar reached the end of each epoch
    assert "loss=0.1" in text and "accuracy=0.5" in text  # training metrics in the postfix
    assert "epoch 2/2 step 20 | eval/loss 0.25 eval/accuracy 0.875" in text


def test_terminal_bar_resumes_mid_epoch():
    out = io.StringIO()
    sink = ConsoleSink(out, terminal=True)
    sink.start(RunInfo(resumed_step=13))
    sink.progress(Progress(step=14, epoch=2, iteration=4, epoch_length=10, max_epochs=3))
    sink.close("KILLED")
    assert "epoch 2/3" in out.getvalue() and "4/10" in out.getvalue()


def test_a_closed_stream_never_raises_into_the_loop():
    out = io.StringIO()
    sink = ConsoleSink(out)
    sink.start(RunInfo())
    out.close()
    sink.log_metrics({"train/loss": 1.0}, 1, 1)
    sink.flush()
    sink.close("FAILED")
