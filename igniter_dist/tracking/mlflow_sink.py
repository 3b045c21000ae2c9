"""MLflow tracking from rank 0: one run per job, continued after restarts, never stalling the loop.

`MlflowSink` turns the engine's calls into typed operations and hands them to a background `Sender`
(queue, retries, buffering through outages). `MlflowRun` makes the MLflow calls, on the sender's
thread: `open` creates or continues the run, `send` is one call (or batch of calls) per operation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .base import Progress, RunInfo, RunStatus
from .sender import Sender, one_line

log = logging.getLogger(__name__)

# Our defaults for MLflow's own variables unless the user set them: one attempt per HTTP request
# (the sender retries by itself, with backoff), a timeout that bounds a request to a hung server,
# and no "View run at ..." lines on stdout when the run ends.
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

# MLflow's limits (mlflow.utils.validation).
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


# ---------------------------------------------------------------- operations


class MetricValue(NamedTuple):  # one per metric per log call: a tuple is the cheapest typed record
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True)
class LogMetrics:
    values: list[MetricValue]


@dataclass(frozen=True)
class LogParams:
    params: Mapping[str, str]  # names and values as MLflow takes them: cut, redacted, new to the run


@dataclass(frozen=True)
class SetTags:
    tags: Mapping[str, str]


@dataclass(frozen=True)
class LogArtifact:
    path: str  # a file, or a folder uploaded under its own name
    artifact_path: str | None = None  # the folder in the run's artifacts (files only)


@dataclass(frozen=True)
class EndRun:
    status: RunStatus


MlflowOp = LogMetrics | LogParams | SetTags | LogArtifact | EndRun


# ---------------------------------------------------------------- the MLflow calls


class MlflowRun:
    """The MLflow calls of one run. Every method runs on the sender's thread, the only one using mlflow."""

    def __init__(self, *, tracking_uri: str | None, experiment_name: str | None, run_name: str | None,
                 tags: dict[str, str], output_dir: str | None, system_metrics: bool):
        self.tracking_uri = tracking_uri  # resolved when the run opens
        self.info = RunInfo()  # set by MlflowSink.start before the sender starts
        self.run_id: str | None = None
        self.local_store: str | None = None  # the sqlite URI of the store we created when no URI was given
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tags = tags
        self._output_dir = output_dir
        self._system_metrics = system_metrics
        self._client: Any = None
        self._store: Any = None  # the local store, which creates experiments with artifacts beside it
        self._monitor: Any = None

    @property
    def name(self) -> str:
        return f"MLflow at {self.tracking_uri or 'its default store'}"

    def transient(self, error: Exception) -> bool:
        return _retryable(error)

    def open(self) -> list[MlflowOp]:
        """Connect, then create the run or continue the one in `RunInfo.run_id` / MLFLOW_RUN_ID."""
        from mlflow.environment_variables import MLFLOW_RUN_ID

        if self._client is None:
            self._client = self._connect()
        if self.run_id is not None:
            return []
        tags = {**self.info.tags, **self._tags}
        run = self._existing_run(self.info.run_id or MLFLOW_RUN_ID.get())
        resumed = run is not None
        if run is not None:
            self._client.update_run(run.info.run_id, "RUNNING")
        else:
            from mlflow.tracking.context.registry import resolve_tags

            run = self._client.create_run(self._experiment_id(), run_name=self._run_name,
                                          tags=resolve_tags(_tag_dict(tags)))
        self.run_id = run.info.run_id
        log.info("MLflow run %s %s at %s", self.run_id, "continues" if resumed else "started", self.tracking_uri)
        self._start_system_metrics(resumed)
        first: list[MlflowOp] = [LogParams(self._new_params(existing=dict(run.data.params)))]
        if resumed:  # tags may have changed since; params may not (MLflow keeps them immutable)
            first.append(SetTags(tags))
        return first

    def send(self, op: MlflowOp) -> None:
        from mlflow.entities import Metric, Param

        client, run_id = self._client, self.run_id
        match op:
            case LogMetrics(values):
                client.log_batch(run_id, metrics=[Metric(_key(v.key), v.value, v.timestamp_ms, v.step)
                                                  for v in values])
            case LogParams(params):
                for chunk in _chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
                    client.log_batch(run_id, params=chunk)
            case SetTags(tags):
                from mlflow.entities import RunTag

                for chunk in _chunks([RunTag(k, v) for k, v in _tag_dict(tags).items()], PARAMS_PER_BATCH):
                    client.log_batch(run_id, tags=chunk)
            case LogArtifact(path, artifact_path):
                if os.path.isdir(path):
                    client.log_artifacts(run_id, path, artifact_path=os.path.basename(os.path.normpath(path)))
                elif os.path.exists(path):
                    client.log_artifact(run_id, path, artifact_path=artifact_path)
                else:
                    log.warning("artifact %s does not exist; not uploaded to MLflow", path)
            case EndRun(status):
                if self._monitor is not None:
                    self._monitor.finish()
                    self._monitor = None  # a retried EndRun does not stop it twice
                client.set_terminated(run_id, status)
                log.info("MLflow run %s ended as %s", run_id, status)

    def _connect(self) -> Any:
        from mlflow import MlflowClient
        from mlflow.environment_variables import MLFLOW_TRACKING_URI

        _quiet_mlflow_logs()
        self.tracking_uri = self.tracking_uri or MLFLOW_TRACKING_URI.get() or self._create_local_store()
        return MlflowClient(self.tracking_uri)

    def _create_local_store(self) -> str:
        """A sqlite store under `<output_dir>/mlruns` (what `mlflow ui --backend-store-uri` opens)."""
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError as e:  # mlflow-skinny alone: a client without the sqlite store
            raise ImportError(f"the local MLflow store needs the full mlflow package ({e}); "
                              "pip install mlflow, or set --mlflow-tracking-uri to a server") from e

        root = Path(self._output_dir or self.info.output_dir or ".").resolve() / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        # Creating the store first gives the Default experiment an artifact folder beside the
        # database; a client alone would put it under ./mlruns of the working directory.
        self._store = SqlAlchemyStore(uri, str(root / "artifacts"))
        self.local_store = uri
        return uri

    def _existing_run(self, run_id: str | None) -> Any:
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if _retryable(e):
                raise
            log.warning("MLflow run %s cannot be continued (%s); starting a new run", run_id, one_line(e))
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s was deleted; starting a new run", run_id)
            return None
        return run

    def _experiment_id(self) -> str:
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME
        from mlflow.exceptions import MlflowException

        name = self._experiment_name or MLFLOW_EXPERIMENT_NAME.get()
        if not name:
            return "0"  # the Default experiment every store has
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        creator = self._store or self._client
        try:
            return str(creator.create_experiment(name))
        except MlflowException:
            exp = self._client.get_experiment_by_name(name)  # another job created it meanwhile
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _new_params(self, existing: dict[str, str]) -> dict[str, str]:
        """This run's params (redacted by RunInfo) not yet in MLflow, values cut to MLflow's limit."""
        params, changed = {}, []
        for name, value in self.info.params.items():
            key = _key(name)
            text = _cut(value, MAX_PARAM_LENGTH)
            if key not in existing:
                params[key] = text
            elif existing[key] != text:
                changed.append(key)
        if changed:
            log.info("MLflow params are immutable; not re-logging values changed on resume: %s",
                     ", ".join(changed))
        return params

    def _start_system_metrics(self, resumed: bool) -> None:
        if not self._system_metrics or importlib.util.find_spec("psutil") is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri)
            monitor.start()
            self._monitor = monitor
        except Exception as e:  # system metrics are a bonus: whatever fails there, the run goes on without them
            log.info("MLflow system metrics are off: %s", one_line(e))


# ---------------------------------------------------------------- the sink


class MlflowSink:
    """Logs params, tags, metrics and artifacts of one MLflow run, on rank 0 only.

    Args:
        tracking_uri: server or store URI; default MLFLOW_TRACKING_URI, else a sqlite store at
            `<output_dir>/mlruns/mlflow.db` with artifacts beside it.
        experiment_name: default MLFLOW_EXPERIMENT_NAME, else the Default experiment.
        history: returns the history files to upload as artifacts when the run closes.
        system_metrics: log CPU, memory, disk, network (and GPU) metrics when psutil is present.
    """

    live = False  # logs nothing per step

    def __init__(self, *, tracking_uri: str | None = None, experiment_name: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 username: str | None = None, password: str | None = None,
                 output_dir: str | None = None, history: Callable[[], list[str]] | None = None,
                 system_metrics: bool = True, start_timeout_s: float = 60.0,
                 flush_timeout_s: float = 5.0, close_timeout_s: float = 30.0,
                 max_buffered: int = 100_000, max_backoff_s: float = 30.0):
        self._run = MlflowRun(tracking_uri=tracking_uri, experiment_name=experiment_name, run_name=run_name,
                              tags=dict(tags or {}), output_dir=output_dir, system_metrics=system_metrics)
        self._sender: Sender[MlflowOp, MetricValue] = Sender(
            self._run, pack=LogMetrics, log=log, thread_name="igniter-mlflow", max_buffered=max_buffered,
            batch_size=METRICS_PER_BATCH, max_backoff_s=max_backoff_s)
        self._username, self._password = username, password
        self._history = history
        self._start_timeout_s, self._flush_timeout_s = start_timeout_s, flush_timeout_s
        self._close_timeout_s = close_timeout_s

    @property
    def run_id(self) -> str | None:
        """The run's id once it exists (right after `start` unless the store was unreachable)."""
        return self._run.run_id

    @property
    def tracking_uri(self) -> str | None:
        """The store in use: the given URI, else MLFLOW_TRACKING_URI, else the local store (once started)."""
        return self._run.tracking_uri

    def start(self, info: RunInfo) -> None:
        """Create or continue the run in the background; wait for its id at most `start_timeout_s`."""
        self._run.info = info
        for name, value in ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # MLflow's client reads credentials from its own variables, on every request.
        if self._username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self._username
        if self._password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self._password
        self._sender.start()
        self._sender.wait_open(self._start_timeout_s)

    def progress(self, p: Progress) -> None:
        pass

    def eval_progress(self, name: str, batch: int, total: int | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._sender.accepting:
            ts = int(time.time() * 1000)
            self._sender.put_values([MetricValue(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifact(self, path: str) -> None:
        self._sender.put(LogArtifact(str(path)))

    def set_tag(self, key: str, value: str) -> None:
        self._sender.put(SetTags({key: value}))

    def flush(self) -> None:
        """Wait until queued data is sent, unless the store is down or `flush_timeout_s` passes."""
        self._sender.flush(self._flush_timeout_s)

    def close(self, status: RunStatus) -> None:
        """Send what is queued, upload the history files, end the run with `status`; bounded in time."""
        if self._sender.accepting:
            for path in self._history() if self._history is not None else []:
                self._sender.put(LogArtifact(path, "history"))
            self._sender.put(EndRun(status))
        unsent = self._sender.unsent
        if not self._sender.close(self._close_timeout_s):
            log.warning("%s did not take the run's end within %.0f s; %d metric values were not sent "
                        "(the output folder has the full history)", self._run.name, self._close_timeout_s, unsent)
        self._show_local_store()

    def _show_local_store(self) -> None:
        """Say how to browse a run in the local store: nothing else points the user to it."""
        if self._run.local_store is None or self.run_id is None:
            return
        try:
            print(f"igniter-dist: MLflow run {self.run_id} is in the local store; browse it with\n"
                  f"  mlflow ui --backend-store-uri {shlex.quote(self._run.local_store)}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: nothing to tell


def _key(name: str) -> str:
    """A name MLflow accepts: alphanumerics, `_ - . /` and spaces, no leading or doubled slash."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).strip("/")
    while "//" in key:
        key = key.replace("//", "/")
    return key[:MAX_KEY_LENGTH] or "_"


def _cut(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tag_dict(tags: Mapping[str, str]) -> dict[str, str]:
    return {_key(k): _cut(v, MAX_TAG_LENGTH) for k, v in tags.items()}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


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


def _quiet_mlflow_logs() -> None:
    """Keep MLflow's INFO lines (database migrations, system metrics) off the console, unless
    MLFLOW_LOGGING_LEVEL asks for them: its warnings still show."""
    from mlflow.environment_variables import MLFLOW_LOGGING_LEVEL

    if MLFLOW_LOGGING_LEVEL.defined:
        return
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
