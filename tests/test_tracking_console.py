"""ConsoleSink: plain lines when stdout is not a terminal (or one of zero width), tqdm bars when it is."""

import fcntl
import io
import os
import re
import struct
import subprocess
import termios
import threading

import pytest

from igniter_dist.tracking.base import Progress, RunInfo
from igniter_dist.tracking.console import ConsoleSink, format_value
from launch import PYTHON, ROOT, child_env

TRAIN = ROOT / "tests" / "workers" / "tracking_train.py"


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


# ---------------------------------------------------------------- what a line holds (issue 15, item 12)

ENGINE_TRAIN = {"train/loss": 0.25, "train/iterations_per_s": 11.0, "train/seconds_per_step": 0.0909,
                "train/samples_per_s": 704.0, "train/lr/optimizer": 3e-4}  # what Engine._log_train logs


def test_a_line_holds_the_loss_the_learning_rate_and_one_rate_but_no_throughput_figures():
    out = io.StringIO()
    sink = ConsoleSink(out)
    sink.start(RunInfo())
    for step in range(1, 6):
        sink.progress(Progress(step=step, epoch=1, iteration=step, epoch_length=10, max_epochs=2))
    sink.log_metrics(ENGINE_TRAIN, 5, 1)
    sink.log_metrics({"train/loss": 0.5, "train/lr/gen": 1e-4, "train/lr/disc/1": 4e-4}, 5, 1)
    first, second = out.getvalue().splitlines()
    assert re.fullmatch(r"epoch 1/2 step 5 \| train/loss 0\.25 \| lr 0\.0003 \| [0-9.e+]+ it/s", first), first
    assert second == "epoch 1/2 step 5 | train/loss 0.5 | lr/gen 0.0001 lr/disc/1 0.0004"  # no new step: no rate


def test_the_terminal_postfix_is_as_short():
    out = io.StringIO()
    sink = ConsoleSink(out, terminal=True)
    sink.start(RunInfo())
    sink.progress(Progress(step=1, epoch=1, iteration=1, epoch_length=10, max_epochs=2))
    sink.log_metrics(ENGINE_TRAIN, 1, 1)
    sink.close("FINISHED")
    assert "loss=0.25 lr=0.0003" in out.getvalue()
    assert "per_s" not in out.getvalue() and "per_step" not in out.getvalue()


def test_evaluation_gets_a_bar_in_a_terminal_and_nothing_per_batch_elsewhere():
    shown = {}
    for terminal in (True, False):
        out = io.StringIO()
        sink = ConsoleSink(out, terminal=terminal)
        sink.start(RunInfo())
        for batch in range(1, 5):
            sink.eval_progress("holdout", batch, 4)
        sink.log_metrics({"holdout/accuracy": 0.75}, 0, 0)
        sink.close("FINISHED")
        shown[terminal] = out.getvalue()
    assert "holdout: " in shown[True] and "0/4" in shown[True]
    assert shown[True].rstrip().endswith("epoch 0 step 0 | holdout/accuracy 0.75")
    assert shown[False] == "epoch 0 step 0 | holdout/accuracy 0.75\n"


class Pty:
    """A pseudo-terminal of a chosen width: `stream` is its end for writing, `text()` what it showed."""

    def __init__(self, columns: int):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.stream = os.fdopen(slave, "w")
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)  # a full pty would block the writer
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the writing end is closed
                return
            if not data:
                return
            self._chunks.append(data)

    def text(self) -> str:
        self.stream.close()
        self._reader.join(10)
        os.close(self.master)
        return b"".join(self._chunks).decode().replace("\r\n", "\n")  # the tty turned \n into \r\n


def console_on_a_pty(columns: int) -> str:
    tty = Pty(columns)
    assert tty.stream.isatty()
    run_epochs(ConsoleSink(tty.stream))
    return tty.text()


def test_a_terminal_of_zero_width_gets_plain_lines(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    sized = console_on_a_pty(100)
    assert "\r" in sized and "10/10" in sized and "loss=0.1 accuracy=0.5" in sized  # a bar, as the contrast
    no_width = console_on_a_pty(0)  # a pty nobody sized, as `docker run -t` may give
    monkeypatch.setenv("COLUMNS", "0")
    told_no_width = console_on_a_pty(100)
    for text in (no_width, told_no_width):
        lines = text.splitlines()
        assert len(lines) == 6 and "\r" not in text, text  # no bar: tqdm redraws with \r
        assert lines[0].startswith("epoch 1/2 step 5 | train/loss 0.2 train/accuracy 0.5 | ")
        assert lines[-1] == "epoch 2/2 step 20 | eval/loss 0.25 eval/accuracy 0.875"


def test_a_training_run_in_a_terminal_shows_bars_for_training_and_evaluation(tmp_path):
    """The engine reports evaluation batches: a real run on a pty shows the evaluator's bar."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = child_env()
    env.pop("COLUMNS", None)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([PYTHON, str(TRAIN), "--output-dir", str(tmp_path / "out"), "--max-epochs", "1"],
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=err, env=env, cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    text = b"".join(chunks).decode()
    assert "epoch 1/1: " in text and "12/12" in text  # the training bar (12 steps)
    assert "lr=0.01" in text and "loss=" in text
    assert "eval: " in text and "/4 " in text  # the evaluator's bar: 4 batches of 5
    assert "epoch 1/1 step 12 | eval/loss " in text
    assert "per_s" not in text and "per_step" not in text
