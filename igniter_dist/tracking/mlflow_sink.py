"""MLflow tracking from rank 0: one run per job, continued after restarts, never stalling the loop.

Calls from the loop only append to in-memory queues. One background thread imports mlflow, owns
the client and does every request; while the store is unreachable it keeps the metrics (up to
`max_buffered` values), warns once and retries with backoff.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..args import REDACTED, is_secret
from .base import Progress, RunInfo, RunStatus

log = logging.getLogger(__name__)

# Our defaults for MLflow's HTTP client unless the user set them: one attempt per request (the
# worker retries by itself, with backoff) and a timeout that bounds a request to a hung server.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

# MLflow's limits (mlflow.utils.validation).
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def _key(name: str) -> str:
    """A name MLflow accepts: alphanumerics, `_ - . /` and spaces, no leading or doubled slash."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).strip("/")
    while "//" in key:
        key = key.replace("//", "/")
    return key[:MAX_KEY_LENGTH] or "_"


def _cut(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retryable(e: BaseException) -> bool:
    """Whether a failed request may succeed later (server down or busy), rather than being wrong."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(e, OSError)  # requests' connection errors and timeouts are OSErrors


class MlflowSink:
    """Logs params, tags, metrics and artifacts of one MLflow run, on rank 0 only.

    Args:
        tracking_uri: server or store URI; default MLFLOW_TRACKING_URI, else a sqlite store at
            `<output_dir>/mlruns/mlflow.db` with artifacts beside it.
        experiment_name: default MLFLOW_EXPERIMENT_NAME, else the Default experiment.
        history: returns the history files to upload as artifacts when the run closes.
        system_metrics: log CPU, memory, disk, network (and GPU) metrics when psutil is present.
    """

    def __init__(self, *, tracking_uri: str | None = None, experiment_name: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 username: str | None = None, password: str | None = None,
                 output_dir: str | None = None, history: Callable[[], list[str]] | None = None,
                 system_metrics: bool = True, start_timeout_s: float = 60.0,
                 flush_timeout_s: float = 5.0, close_timeout_s: float = 30.0,
                 max_buffered: int = 100_000, max_backoff_s: float = 30.0):
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tags = dict(tags or {})
        self._username, self._password = username, password
        self._output_dir = output_dir
        self._history = history
        self._system_metrics = system_metrics
        self._start_timeout_s, self._flush_timeout_s = start_timeout_s, flush_timeout_s
        self._close_timeout_s, self._max_backoff_s = close_timeout_s, max_backoff_s

        self._ops: deque[tuple[Any, ...]] = deque()  # ("params" | "tags" | "artifact", ...), in order
        self._metrics: deque[tuple[str, float, int, int]] = deque(maxlen=max_buffered)
        self._inflight: list[tuple[str, float, int, int]] = []  # the batch being sent
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "new"  # new -> up <-> down; off once a request can never succeed
        self._closing: RunStatus | None = None
        self._abandoned = False
        self._overflowed = 0
        self._info = RunInfo()
        self._client: Any = None
        self._embedded: Any = None  # the sqlite store we created, when no URI was given
        self._monitor: Any = None
        self._run_id: str | None = None
        self._resumed = False
        self._finish_steps = ["monitor", "history", "status"]
        self.tracking_uri: str | None = tracking_uri

    @property
    def run_id(self) -> str | None:
        """The run's id once it exists (right after `start` unless the store was unreachable)."""
        return self._run_id

    # The loop's side: append and wake the worker, nothing else.

    def start(self, info: RunInfo) -> None:
        """Create or continue the run in the background; wait for its id at most `start_timeout_s`."""
        self._info = info
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # MLflow's client reads credentials from its own variables, on every request.
        if self._username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self._username
        if self._password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self._password
        self._thread = threading.Thread(target=self._work, name="igniter-mlflow", daemon=True)
        self._thread.start()
        self._wait(lambda: self._run_id is not None, self._start_timeout_s)

    def progress(self, p: Progress) -> None:
        pass

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._state == "off" or self._thread is None:
            return
        ts = int(time.time() * 1000)
        overflow = len(self._metrics) + len(metrics) - (self._metrics.maxlen or 0)
        if overflow > 0:
            if not self._overflowed:
                log.warning("MLflow buffer is full (%d values); the oldest metrics are dropped from "
                            "MLflow until it answers again (the output folder keeps them all)",
                            self._metrics.maxlen)
            self._overflowed += overflow
        self._metrics.extend((k, float(v), ts, step) for k, v in metrics.items())
        self._wake.set()

    def log_artifact(self, path: str) -> None:
        self._enqueue(("artifact", str(path)))

    def set_tag(self, key: str, value: str) -> None:
        self._enqueue(("tags", {key: value}))

    def flush(self) -> None:
        """Wait until queued data is sent, unless the store is down or `flush_timeout_s` passes."""
        if self._thread is not None:
            self._wake.set()
            self._wait(self._idle, self._flush_timeout_s)

    def close(self, status: RunStatus) -> None:
        """Send what is queued, upload the history files, end the run with `status`; bounded in time."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._closing = status
        self._wake.set()
        thread.join(self._close_timeout_s)
        if thread.is_alive():
            self._abandoned = True
            self._wake.set()
            unsent = len(self._metrics) + len(self._inflight)
            log.warning("MLflow at %s did not take the run's end within %.0f s; %d metric values were "
                        "not sent (the output folder has the full history)",
                        self.tracking_uri, self._close_timeout_s, unsent)

    def _enqueue(self, op: tuple[Any, ...]) -> None:
        if self._state != "off" and self._thread is not None:
            self._ops.append(op)
            self._wake.set()

    def _idle(self) -> bool:
        return not (self._ops or self._metrics or self._inflight)

    def _wait(self, done: Callable[[], bool], timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: done() or self._state in ("down", "off"), timeout)

    # The worker's side: every MLflow call happens below, on the worker thread.

    def _work(self) -> None:
        backoff = 1.0
        while not self._abandoned:
            self._wake.clear()
            try:
                if self._run_id is None or self._state == "new":
                    self._open()
                self._drain()
                if self._closing is not None:
                    self._finish(self._closing)
                    self._set_state("up")
                    return
            except Exception as e:  # noqa: BLE001 - the worker must outlive any failure
                if self._abandoned:
                    return
                if not _retryable(e):
                    self._turn_off(e)
                    return
                self._set_state("down", e)
                self._wake.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            backoff = 1.0
            self._set_state("up")
            self._wake.wait()

    def _set_state(self, state: str, error: BaseException | None = None) -> None:
        with self._cond:
            before, self._state = self._state, state
            self._cond.notify_all()
        if state == "down" and before != "down":
            log.warning("MLflow at %s is unreachable (%s); metrics stay buffered and are sent when it "
                        "answers again, training goes on", self.tracking_uri, _one_line(error))
        elif state == "up" and before == "down":
            log.info("MLflow at %s answers again; sending %d buffered metric values",
                     self.tracking_uri, len(self._metrics) + len(self._inflight))

    def _turn_off(self, error: BaseException) -> None:
        self._ops.clear()
        self._metrics.clear()
        self._inflight = []
        with self._cond:
            self._state = "off"
            self._cond.notify_all()
        log.warning("MLflow tracking is off for the rest of this run: %s", _one_line(error))

    def _open(self) -> None:
        """Connect, then create the run or continue the one in `RunInfo.run_id` / MLFLOW_RUN_ID."""
        from mlflow.environment_variables import MLFLOW_RUN_ID

        if self._client is None:
            from mlflow import MlflowClient
            from mlflow.environment_variables import MLFLOW_TRACKING_URI

            self.tracking_uri = self._tracking_uri or MLFLOW_TRACKING_URI.get() or self._embedded_store()
            self._client = MlflowClient(self.tracking_uri)
        if self._run_id is None:
            run = self._existing_run(self._info.run_id or MLFLOW_RUN_ID.get())
            if run is not None:
                self._client.update_run(run.info.run_id, "RUNNING")
                self._resumed = True
            else:
                from mlflow.tracking.context.registry import resolve_tags

                tags = {_key(k): _cut(v, MAX_TAG_LENGTH) for k, v in {**self._info.tags, **self._tags}.items()}
                run = self._client.create_run(self._experiment_id(), run_name=self._run_name,
                                              tags=resolve_tags(tags))
            if self._resumed:  # tags may have changed since; params may not (MLflow keeps them immutable)
                self._ops.appendleft(("tags", {**self._info.tags, **self._tags}))
            self._ops.appendleft(("params", dict(run.data.params)))
            with self._cond:
                self._run_id = run.info.run_id
                self._cond.notify_all()
            log.info("MLflow run %s %s at %s", self._run_id,
                     "continues" if self._resumed else "started", self.tracking_uri)
        self._start_system_metrics()
        self._set_state("up")

    def _existing_run(self, run_id: str | None) -> Any:
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if _retryable(e):
                raise
            log.warning("MLflow run %s cannot be continued (%s); starting a new run", run_id, _one_line(e))
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s was deleted; starting a new run", run_id)
            return None
        return run

    def _embedded_store(self) -> str:
        """A sqlite store under `<output_dir>/mlruns` (what `mlflow ui --backend-store-uri` opens)."""
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError as e:  # mlflow-skinny alone: a client without the sqlite store
            raise ImportError(f"the local MLflow store needs the full mlflow package ({e}); "
                              "pip install mlflow, or set --mlflow-tracking-uri to a server") from e

        root = Path(self._output_dir or self._info.output_dir or ".").resolve() / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        # Creating the store first gives the Default experiment an artifact folder beside the
        # database; a client alone would put it under ./mlruns of the working directory.
        self._embedded = SqlAlchemyStore(uri, str(root / "artifacts"))
        return uri

    def _experiment_id(self) -> str:
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME
        from mlflow.exceptions import MlflowException

        name = self._experiment_name or MLFLOW_EXPERIMENT_NAME.get()
        if not name:
            return "0"  # the Default experiment every store has
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        creator = self._embedded or self._client
        try:
            return creator.create_experiment(name)
        except MlflowException as e:
            exp = self._client.get_experiment_by_name(name)  # another job created it meanwhile
            if exp is None:
                raise e
            return exp.experiment_id

    def _start_system_metrics(self) -> None:
        if not self._system_metrics or self._monitor is not None or importlib.util.find_spec("psutil") is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, resume_logging=self._resumed,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a bonus, never a failure
            log.info("MLflow system metrics are off: %s", _one_line(e))
            self._monitor = False

    def _drain(self) -> None:
        """Send every queued op, then every buffered metric; a retryable failure raises, keeping the item."""
        while self._ops or self._metrics or self._inflight:
            if self._ops:
                self._apply_or_skip(self._ops[0])
                self._ops.popleft()
            else:
                if not self._inflight:
                    n = min(METRICS_PER_BATCH, len(self._metrics))
                    self._inflight = [self._metrics.popleft() for _ in range(n)]
                self._apply_or_skip(("metrics", self._inflight))
                self._inflight = []
            with self._cond:
                self._cond.notify_all()

    def _apply_or_skip(self, op: tuple[Any, ...]) -> None:
        try:
            self._apply(op)
        except Exception as e:  # noqa: BLE001 - a bad item is dropped, a down server retried
            if _retryable(e):
                raise
            log.warning("MLflow rejected %s (%s); skipping it", op[0], _one_line(e))

    def _apply(self, op: tuple[Any, ...]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, run_id, client = op[0], self._run_id, self._client
        if kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(_key(k), v, ts, step) for k, v, ts, step in op[1]])
        elif kind == "params":
            params = self._new_params(existing=op[1])
            for i in range(0, len(params), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + PARAMS_PER_BATCH]])
        elif kind == "tags":
            tags = [RunTag(_key(k), _cut(v, MAX_TAG_LENGTH)) for k, v in op[1].items()]
            for i in range(0, len(tags), PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=tags[i:i + PARAMS_PER_BATCH])
        elif kind == "artifact":
            path = op[1]
            if os.path.isdir(path):
                client.log_artifacts(run_id, path, artifact_path=os.path.basename(os.path.normpath(path)))
            elif os.path.exists(path):
                client.log_artifact(run_id, path, artifact_path=op[2] if len(op) > 2 else None)
            else:
                log.warning("artifact %s does not exist; not uploaded to MLflow", path)

    def _new_params(self, existing: dict[str, str]) -> list[tuple[str, str]]:
        """This run's params not yet in MLflow, secrets redacted, values cut to MLflow's limit."""
        params, changed = [], []
        for name, value in self._info.params.items():
            key = _key(name)
            text = REDACTED if is_secret(name) and value not in (None, "") else _cut(value, MAX_PARAM_LENGTH)
            if key not in existing:
                params.append((key, text))
            elif existing[key] != text:
                changed.append(key)
        if changed:
            log.info("MLflow params are immutable; not re-logging values changed on resume: %s",
                     ", ".join(changed))
        return params

    def _finish(self, status: RunStatus) -> None:
        """Stop system metrics, upload the history files, set the final status (resumable steps)."""
        while self._finish_steps:
            step = self._finish_steps[0]
            if step == "monitor" and self._monitor:
                self._monitor.finish()
            elif step == "history" and self._history is not None:
                for path in self._history():
                    self._apply_or_skip(("artifact", path, "history"))
            elif step == "status":
                self._client.set_terminated(self._run_id, status)
            self._finish_steps.pop(0)
        log.info("MLflow run %s ended as %s", self._run_id, status)


def _one_line(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
