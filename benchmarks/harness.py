"""Shared benchmark plumbing: per-step clocks, interleaved rounds, ratios to raw, tables, launching.

Benchmarks report what they measure; they never assert on timings.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
BENCH_PYTHON = BENCH / ".venv" / "bin" / "python"
OUT = ROOT / "runs" / "bench"  # /runs/ is git-ignored
RAW = "raw"

# ---------------------------------------------------------------------------- per-step clock


class StepClock:
    """Times each iteration from outside the framework under test.

    `begin`/`end` bracket the user's step (forward, backward, optimizer step); patches time every
    `next(loader)` and every collective called from Python (`torch.distributed.*` and
    `Work.wait`). An iteration is the interval between two consecutive `begin`s. The framework's
    own time in it is what is left after the step and the loader's `next`; the collectives it
    issued between steps are reported apart, as `collective_us`, and are included in `framework_us`.
    """

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.data_starts: list[float] = []
        self.data_durations: list[float] = []
        self.coll_starts: list[float] = []
        self.coll_durations: list[float] = []

    def begin(self) -> None:
        self.begins.append(time.perf_counter())

    def end(self) -> None:
        self.ends.append(time.perf_counter())

    def data(self, start: float, duration: float) -> None:
        self.data_starts.append(start)
        self.data_durations.append(duration)

    def collective(self, start: float, duration: float) -> None:
        self.coll_starts.append(start)
        self.coll_durations.append(duration)

    def iterations(self, skip: int) -> list[dict[str, float]]:
        """Per-iteration seconds (total, step, data, framework) after the first `skip` steps."""
        out = []
        n = min(len(self.begins), len(self.ends))
        for i in range(skip, n - 1):
            t0, t_end, t1 = self.begins[i], self.ends[i], self.begins[i + 1]
            data = _sum_between(self.data_starts, self.data_durations, t_end, t1)
            coll = _sum_between(self.coll_starts, self.coll_durations, t_end, t1)
            calls = bisect.bisect_left(self.coll_starts, t1) - bisect.bisect_left(self.coll_starts, t_end)
            step = t_end - t0
            total = t1 - t0
            out.append({"total": total, "step": step, "data": data, "framework": total - step - data,
                        "collective": coll, "collective_calls": calls})
        return out

    def summary(self, skip: int) -> dict[str, float]:
        its = self.iterations(skip)
        if not its:
            raise RuntimeError(f"only {len(self.begins)} steps timed, {skip} of them warm-up")
        totals = [i["total"] for i in its]
        return {
            "steps": len(its),
            "median_s": statistics.median(totals),
            "mean_s": statistics.fmean(totals),
            "step_us": 1e6 * statistics.median(i["step"] for i in its),
            "data_us": 1e6 * statistics.median(i["data"] for i in its),
            "framework_us": 1e6 * statistics.median(i["framework"] for i in its),
            "collective_us": 1e6 * statistics.median(i["collective"] for i in its),
            "framework_ex_collective_us": 1e6 * statistics.median(i["framework"] - i["collective"] for i in its),
            "collective_calls": statistics.median(i["collective_calls"] for i in its),
        }


def _sum_between(starts: list[float], durations: list[float], lo: float, hi: float) -> float:
    """The total duration of the calls that started in [lo, hi) (between one step's end and the next's begin)."""
    return sum(durations[bisect.bisect_left(starts, lo):bisect.bisect_left(starts, hi)])


@contextmanager
def timed_loader_next(clock: StepClock) -> Iterator[None]:
    """Time every DataLoader `next` (single- and multi-process iterators share this method)."""
    from torch.utils.data import dataloader

    cls = dataloader._BaseDataLoaderIter
    original = cls.__next__

    def __next__(self: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self)
        finally:
            clock.data(t0, time.perf_counter() - t0)

    cls.__next__ = __next__  # type: ignore[method-assign]  # timing wraps the method for the run
    try:
        yield
    finally:
        cls.__next__ = original  # type: ignore[method-assign]


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "barrier", "all_gather_object", "broadcast_object_list", "gather_object", "monitored_barrier")


@contextmanager
def timed_collectives(clock: StepClock) -> Iterator[None]:
    """Time every collective called through `torch.distributed` and every `Work.wait` (outermost call only)."""
    import torch.distributed as dist

    depth = [0]

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.collective(t0, time.perf_counter() - t0)
                depth[0] -= 1
        return wrapper

    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    wait = dist.Work.wait
    for name, fn in originals.items():
        setattr(dist, name, timed(fn))
    dist.Work.wait = timed(wait)  # type: ignore[method-assign]  # timing wraps the method for the run
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.Work.wait = wait  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- rounds and ratios


def schedule(impls: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """Interleave raw between the others, rotating their order each round: raw, X, raw, Y, ..., raw."""
    order: list[tuple[int, str]] = []
    for r in range(rounds):
        shift = r % max(1, len(impls))
        rotated = list(impls[shift:]) + list(impls[:shift])
        for name in rotated:
            order += [(r, RAW), (r, name)]
        order.append((r, RAW))
    return order


def ratios(runs: list[dict[str, Any]], key: str = "median_s") -> dict[str, list[float]]:
    """Each run's `key` over the mean of the raw runs on either side of it (same round).

    For raw itself this is the noise floor: a raw run against its neighbouring raw runs.
    """
    out: dict[str, list[float]] = {}
    for r in sorted({run["round"] for run in runs}):
        seq = [run for run in runs if run["round"] == r]
        raw_at = [i for i, run in enumerate(seq) if run["impl"] == RAW]
        for i, run in enumerate(seq):
            before = [j for j in raw_at if j < i]
            after = [j for j in raw_at if j > i]
            neighbours = ([before[-1]] if before else []) + ([after[0]] if after else [])
            if not neighbours or (run["impl"] == RAW and len(neighbours) < 2):
                continue  # the first and last raw runs of a round have one neighbour only
            base = statistics.fmean(seq[j][key] for j in neighbours)
            out.setdefault(run["impl"], []).append(run[key] / base)
    return out


def spread(values: Sequence[float]) -> str:
    """`1.02 (0.97-1.06)`: the median and the range."""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def median_of(runs: list[dict[str, Any]], impl: str, key: str) -> float | None:
    values = [run[key] for run in runs if run["impl"] == impl and run.get(key) is not None]
    return statistics.median(values) if values else None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- processes and machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # every rank one thread: stable timings, no oversubscription
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def torchrun_cmd(python: str | Path, script: str | Path, args: Sequence[str], nproc: int) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args]


def run_logged(cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
               timeout: float = 900) -> None:
    """Run a command with its output in `log`; on failure raise with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.run(list(cmd), env=child_env(env), stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"exit {p.returncode}: {' '.join(map(str, cmd))}\n{tail}")


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
