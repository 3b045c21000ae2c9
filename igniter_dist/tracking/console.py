"""What rank 0 prints: tqdm bars in a terminal, one plain line per log call otherwise."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from typing import Any, TextIO

from .base import Progress, RunInfo, RunStatus

# The engine's throughput figures: metrics.jsonl and MLflow keep them, the console shows its own it/s only.
THROUGHPUT = frozenset({"train/iterations_per_s", "train/seconds_per_step", "train/samples_per_s"})
LEARNING_RATE = "train/lr/"  # the engine logs train/lr/<optimizer>[/<param group>]


def format_value(x: float) -> str:
    """A metric as people read it: 0.3412, 0.91, 12.3, 23457, 3e-04, nan."""
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 1e4:
        return f"{x:.0f}"
    return f"{x:.4g}"


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal behind `stream`, 0 when it reports none.

    COLUMNS wins when set, as in `shutil.get_terminal_size`, but 0 there means no width rather than
    "ask the device": it is how a shell or a container says the output has no usable width.
    """
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit():
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # a stream without a file descriptor
        return shutil.get_terminal_size(fallback=(0, 0)).columns


class ConsoleSink:
    """Prints progress and metrics on rank 0 (the factory gives other ranks a null sink).

    In a terminal: one tqdm bar per epoch (iteration, it/s, ETA) with the training loss and learning
    rate in its postfix, a transient bar per evaluation, and evaluation results as lines above the bar.
    Elsewhere (SageMaker, CloudWatch, files, a terminal of zero width): one line per `log_metrics`
    call, such as `epoch 2/10 step 150 | train/loss 0.3412 | lr 0.0003 | 12.3 it/s`. Throughput
    figures (samples/s, seconds/step) are left to metrics.jsonl and MLflow.
    """

    run_id: str | None = None

    def __init__(self, stream: TextIO | None = None, *, terminal: bool | None = None):
        self._stream = stream if stream is not None else sys.stdout
        if terminal is None:
            isatty = getattr(self._stream, "isatty", None)
            terminal = bool(isatty and isatty()) and terminal_columns(self._stream) > 0
        self._terminal = terminal
        self.live = terminal  # a bar moves every step; a line needs the position only when it prints
        self._last: Progress | None = None
        self._max_epochs: int | None = None
        self._bar: Any = None  # tqdm bar of the current epoch, terminal mode only
        self._bar_epoch = 0
        self._steps_bar = False  # with --max-steps one bar counts the run's optimizer steps
        self._eval_bar: Any = None  # tqdm bar of the evaluator running now, terminal mode only
        self._eval_name = ""
        self._rate_step = 0
        self._rate_time = time.monotonic()
        self._broken = False

    def start(self, info: RunInfo) -> None:
        self._last = None  # the rate counts from the first step, not from set-up (MLflow may take seconds)

    def progress(self, p: Progress) -> None:
        # Called every step in a terminal: two comparisons, an assignment and tqdm's own rate-limited update.
        if self._last is None:
            self._rate_step, self._rate_time = p.step, time.monotonic()
        self._last = p
        bar = self._bar
        if bar is not None and self._steps_bar:
            bar.update(p.optimizer_step - bar.n)
        elif bar is not None and p.epoch == self._bar_epoch:
            bar.update(p.iteration - bar.n)
        elif self._terminal and not self._broken:
            self._open_bar(p)

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        if not self._terminal or self._broken:
            return
        bar = self._eval_bar
        if bar is None or name != self._eval_name:
            bar = self._open_eval_bar(name, total)
        bar.update(batch - bar.n)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._broken:
            return
        try:
            self._close_eval_bar()
            if self._terminal:
                self._show_in_terminal(metrics, step, epoch)
            else:
                self._write(self.line(metrics, step, epoch))
        except (OSError, ValueError):
            self._broken = True  # stdout closed: stay quiet rather than fail the loop

    def line(self, metrics: dict[str, float], step: int, epoch: int) -> str:
        """The plain record of one log call: where, what, and the iteration rate since the last line."""
        p = self._last
        max_epochs = p.max_epochs if p is not None else self._max_epochs
        where = f"epoch {epoch}/{max_epochs} step {step}" if max_epochs else f"epoch {epoch} step {step}"
        if p is not None and p.max_steps is not None:  # --max-steps counts optimizer steps
            where += f"/{p.max_steps}" if p.optimizer_step == p.step else (
                f" (optimizer step {p.optimizer_step}/{p.max_steps})")
        parts = [where]
        values, rates = _split(metrics)
        if values:
            parts.append(" ".join(f"{k} {format_value(v)}" for k, v in values.items()))
        if rates:
            parts.append(" ".join(f"{k} {format_value(v)}" for k, v in rates.items()))
        rate = self._rate(step)
        if rate is not None:
            parts.append(f"{format_value(float(f'{rate:.3g}'))} it/s")
        return " | ".join(parts)

    def log_artifact(self, path: str) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._broken = True

    def close(self, status: RunStatus) -> None:
        try:
            self._close_eval_bar()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        except (OSError, ValueError):
            self._broken = True
        self.flush()

    def _rate(self, step: int) -> float | None:
        now = time.monotonic()
        steps, seconds = step - self._rate_step, now - self._rate_time
        if steps <= 0 or seconds <= 0:
            return None
        self._rate_step, self._rate_time = step, now
        return steps / seconds

    def _open_bar(self, p: Progress) -> None:
        from tqdm.auto import tqdm

        if self._bar is not None:
            self._bar.close()
        self._max_epochs = p.max_epochs
        self._bar_epoch = p.epoch
        self._steps_bar = p.max_steps is not None
        if self._steps_bar:
            self._bar = tqdm(total=p.max_steps, initial=p.optimizer_step, desc="steps", unit="step",
                             file=self._stream, dynamic_ncols=True, leave=True)
            return
        desc = f"epoch {p.epoch}/{p.max_epochs}" if p.max_epochs else f"epoch {p.epoch}"
        self._bar = tqdm(total=p.epoch_length, initial=p.iteration, desc=desc,
                         unit="it", file=self._stream, dynamic_ncols=True, leave=True)

    def _open_eval_bar(self, name: str, total: int | None) -> Any:
        from tqdm.auto import tqdm

        self._close_eval_bar()
        self._eval_name = name
        # Below the epoch's bar, and wiped once done: the results line that follows is what stays.
        self._eval_bar = tqdm(total=total, desc=name, unit="batch", file=self._stream, dynamic_ncols=True,
                              leave=False, position=1 if self._bar is not None else 0)
        return self._eval_bar

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            bar, self._eval_bar = self._eval_bar, None
            bar.close()

    def _show_in_terminal(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        train = {k: v for k, v in metrics.items() if k.startswith("train/") or "/" not in k}
        others = {k: v for k, v in metrics.items() if k not in train}
        if train and self._bar is not None:
            values, rates = _split(train)
            shown = {**{_short(k): v for k, v in values.items()}, **rates}
            self._bar.set_postfix_str(" ".join(f"{k}={format_value(v)}" for k, v in shown.items()))
            self._rate(step)
        if others or (train and self._bar is None):
            line = self.line(others or train, step, epoch)
            if self._bar is not None:
                self._bar.write(line, file=self._stream)
            else:
                self._write(line)

    def _write(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


def _split(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """What the console shows of one log call: the metrics, and the learning rates under short names.

    Throughput figures are dropped; one learning rate reads `lr`, several `lr/<optimizer>[/<group>]`.
    """
    values = {k: v for k, v in metrics.items() if k not in THROUGHPUT and not k.startswith(LEARNING_RATE)}
    rates = {k[len("train/"):]: v for k, v in metrics.items() if k.startswith(LEARNING_RATE)}
    if len(rates) == 1:
        rates = {"lr": next(iter(rates.values()))}
    return values, rates


def _short(name: str) -> str:
    return name[len("train/"):] if name.startswith("train/") else name
