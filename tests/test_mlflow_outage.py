"""A tracking server that goes away: the loop's calls stay cheap, metrics wait in memory, close() is bounded.

The real session server sits behind a TCP proxy; stopping the proxy makes the server refuse
connections exactly as a stopped server does, and starting it again brings the same server back.
"""

import logging
import time
import uuid

import pytest
from fixtures_mlflow import TcpProxy

from igniter_dist.tracking.base import RunInfo
from igniter_dist.tracking.mlflow_sink import MlflowSink

SINK_LOG = "igniter_dist.tracking.mlflow_sink"


pytestmark = pytest.mark.usefixtures("clean_mlflow_env")


@pytest.fixture
def proxy(mlflow_server):
    p = TcpProxy(mlflow_server).start()
    yield p
    p.stop()


def sink_for(proxy, **kw):
    return MlflowSink(tracking_uri=proxy.url, experiment_name=f"outage-{uuid.uuid4().hex[:8]}",
                      system_metrics=False, max_backoff_s=2.0, **kw)


def timed_logs(sink, steps) -> float:
    """Mean seconds per log_metrics call over `steps`."""
    total = 0.0
    for step in steps:
        t = time.perf_counter()
        sink.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step, 1)
        total += time.perf_counter() - t
    return total / len(steps)


def sink_messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.name == SINK_LOG and r.levelno >= level]


def wait_for(predicate, timeout=180.0):
    # Generous: the server shares two loaded cores, and each poll of a metric history costs it too.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1.0)
    return False


def steps_in(mlflow_server, run_id):
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(mlflow_server).get_metric_history(run_id, "train/loss"))


def test_server_stopped_mid_run_costs_the_loop_nothing_and_loses_no_metric(proxy, mlflow_server, caplog,
                                                                          record_property):
    sink = sink_for(proxy)
    sink.start(RunInfo(params={"lr": 0.1}))
    healthy = timed_logs(sink, range(1, 301))
    sink.flush()
    proxy.stop()
    down = timed_logs(sink, range(301, 601))
    assert wait_for(lambda: any("unreachable" in m for m in sink_messages(caplog)))
    down = (down + timed_logs(sink, range(601, 901))) / 2
    ratio = down / healthy
    record_property("log_call_seconds_healthy", healthy)
    record_property("log_call_seconds_server_down", down)
    record_property("log_call_time_ratio_down_vs_healthy", ratio)
    print(f"log_metrics per call: healthy {healthy * 1e6:.1f} us, server down {down * 1e6:.1f} us, "
          f"ratio {ratio:.2f}")

    proxy.start()  # the server is back: buffered metrics go out in the background
    assert wait_for(lambda: steps_in(mlflow_server, sink.run_id) == list(range(1, 901)))
    sink.close("FINISHED")
    unreachable = [m for m in sink_messages(caplog) if "unreachable" in m]
    assert len(unreachable) == 1, sink_messages(caplog)
    assert any("answers again" in m for m in sink_messages(caplog, logging.INFO))


def test_server_that_stays_down_lets_close_return_in_bounded_time(proxy, caplog):
    sink = sink_for(proxy, close_timeout_s=5.0)
    sink.start(RunInfo())
    timed_logs(sink, range(1, 51))
    sink.flush()
    proxy.stop()
    timed_logs(sink, range(51, 101))
    sink.flush()  # returns at once once the worker knows the server is down
    t = time.monotonic()
    sink.close("FINISHED")
    elapsed = time.monotonic() - t
    print(f"close() with the server down returned after {elapsed:.1f} s")
    assert elapsed < 60
    messages = sink_messages(caplog)
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("were not sent" in m for m in messages) == 1, messages


def test_server_down_at_start_gets_the_run_and_its_metrics_once_it_answers(proxy, mlflow_server, caplog):
    proxy.stop()
    sink = sink_for(proxy)
    t = time.monotonic()
    sink.start(RunInfo(params={"lr": 0.1}))
    print(f"start() with the server down returned after {time.monotonic() - t:.1f} s")
    assert sink.run_id is None  # known later; the engine reads run_id at each checkpoint
    timed_logs(sink, range(1, 21))
    proxy.start()
    assert wait_for(lambda: sink.run_id is not None and steps_in(mlflow_server, sink.run_id) == list(range(1, 21)))
    sink.close("FINISHED")
    from mlflow import MlflowClient

    assert sink.run_id is not None
    run = MlflowClient(mlflow_server).get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert sum("unreachable" in m for m in sink_messages(caplog)) == 1
