"""The machine-readable history in the output folder: args.json, metrics.jsonl and one CSV per evaluator.

Files are appended across runs. When a run resumes from step N, records after step N (logged by
an attempt that died before its next checkpoint, and about to be logged again) are dropped first,
so each step appears once and steps only grow. A fresh start drops nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .base import Progress, RunInfo, RunStatus

log = logging.getLogger(__name__)

RESERVED = ("step", "epoch", "time")


def _json_value(x: float) -> float | None:
    # Strict JSON has no NaN or Infinity: write null so every JSON reader parses the file.
    x = float(x)
    return x if math.isfinite(x) else None


def _write_atomic(path: Path, write: Callable[[TextIO], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def _step_of(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


class CsvHistory:
    """One CSV file of `step, epoch, time, <metrics...>`; new metric names widen the header in place."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        self.columns: list[str] = []
        self._keep_until = keep_until_step
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None

    def append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self._open(list(row))
        new = [k for k in row if k not in self.columns]
        if new:
            self._rewrite(self.columns + new)
        assert self._writer is not None
        self._writer.writerow(row)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None

    def _open(self, columns: list[str]) -> None:
        header, rows = self._read()
        kept = rows if self._keep_until is None else [
            r for r in rows if (s := _step_of(r.get("step"))) is not None and s <= self._keep_until]
        self.columns = header + [c for c in columns if c not in header]
        if header != self.columns or len(kept) != len(rows):
            self._write_all(self.columns, kept)
        self._append_mode()

    def _rewrite(self, columns: list[str]) -> None:
        self.close()
        _, rows = self._read()
        self.columns = columns
        self._write_all(columns, rows)
        self._append_mode()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _write_all(self, columns: list[str], rows: list[dict[str, str]]) -> None:
        def write(f: TextIO) -> None:
            w = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

        _write_atomic(self.path, write)

    def _append_mode(self) -> None:
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, restval="", extrasaction="ignore")


class FileSink:
    """Writes `<output_dir>/args.json`, `metrics.jsonl` and `<prefix>.csv` per evaluator, on rank 0.

    A metric `eval/accuracy` goes to metrics.jsonl and, as column `accuracy`, to eval.csv; training
    metrics (`train/...`) and names without a prefix go to metrics.jsonl only.
    """

    run_id: str | None = None
    live = False  # writes nothing per step

    def __init__(self, output_dir: str | os.PathLike[str]):
        self.dir = Path(output_dir)
        self._jsonl: TextIO | None = None
        self._csvs: dict[str, CsvHistory] = {}
        self._keep_until: int | None = None  # the resumed step, whose later records are dropped
        self._broken = False

    @property
    def jsonl_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def args_path(self) -> Path:
        return self.dir / "args.json"

    def paths(self) -> list[str]:
        """The files this sink has written, for uploading as artifacts."""
        found = [self.args_path, self.jsonl_path, *(c.path for c in self._csvs.values())]
        return [str(p) for p in found if p.exists()]

    def start(self, info: RunInfo) -> None:
        # Only a resume rolls back: `ig.evaluate` into the same folder also starts at step 0.
        self._keep_until = info.resumed_step or None
        self._guard(self._start, info)

    def progress(self, p: Progress) -> None:
        pass

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if not self._broken:
            self._guard(self._log, metrics, step, epoch)

    def log_artifact(self, path: str) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> None:
        if not self._broken:
            self._guard(self._flush)

    def close(self, status: RunStatus) -> None:
        self.flush()
        for c in self._csvs.values():
            c.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def _start(self, info: RunInfo) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.args_path, lambda f: json.dump(info.params, f, indent=2, sort_keys=True, default=str))
        if self._keep_until is not None:
            self._drop_records_after(self._keep_until)
        self._jsonl = open(self.jsonl_path, "a")

    def _drop_records_after(self, step: int) -> None:
        if not self.jsonl_path.exists():
            return
        with open(self.jsonl_path) as f:
            lines = f.readlines()
        kept = [line for line in lines if (s := self._record_step(line)) is not None and s <= step]
        if len(kept) != len(lines):
            log.info("%s: dropped %d records logged after step %d by an earlier attempt",
                     self.jsonl_path, len(lines) - len(kept), step)
            _write_atomic(self.jsonl_path, lambda f: f.writelines(kept))

    @staticmethod
    def _record_step(line: str) -> int | None:
        try:
            return _step_of(json.loads(line).get("step"))
        except (ValueError, AttributeError):
            return None  # a line torn by a crash

    def _log(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        now = round(time.time(), 3)
        record: dict[str, Any] = {"step": step, "epoch": epoch, "time": now}
        record.update((k, _json_value(v)) for k, v in metrics.items() if k not in RESERVED)
        assert self._jsonl is not None, "FileSink.start was not called"
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        groups: dict[str, dict[str, Any]] = {}
        for name, value in metrics.items():
            prefix, sep, metric = name.partition("/")
            if sep and prefix != "train":
                groups.setdefault(prefix, {"step": step, "epoch": epoch, "time": now})[metric] = float(value)
        for prefix, row in groups.items():
            self._csv(prefix).append(row)

    def _csv(self, prefix: str) -> CsvHistory:
        if prefix not in self._csvs:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix)
            self._csvs[prefix] = CsvHistory(self.dir / f"{safe}.csv", self._keep_until)
        return self._csvs[prefix]

    def _flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        for c in self._csvs.values():
            c.flush()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as e:
            # A full or read-only disk must not end a training run: warn once and stop writing.
            self._broken = True
            log.warning("metrics history in %s is off for the rest of this run: %s", self.dir, e)
