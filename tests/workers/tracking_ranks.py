"""Builds the sinks on every rank of a torchrun job, logs three intervals, reports what each rank saw.

Writes <report-dir>/rank<N>.json: whether mlflow was imported on that rank and the run id it holds.
"""

import argparse
import json
import os
import sys

from igniter_dist.runtime import exit_process, init_runtime, shutdown_runtime
from igniter_dist.tracking.base import Progress, RunInfo
from igniter_dist.tracking.factory import MlflowConfig, build_sinks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir")
    p.add_argument("--report-dir")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment")
    a = p.parse_args()
    rt = init_runtime("cpu")
    sinks = build_sinks(rt, output_dir=a.output_dir, console=True, mlflow=MlflowConfig(
        enable=True, tracking_uri=a.tracking_uri, experiment_name=a.experiment))
    sinks.start(RunInfo(params={"lr": 0.1}, output_dir=a.output_dir))
    run_id = rt.broadcast_object(sinks.run_id)
    for step in range(1, 31):
        sinks.progress(Progress(step=step, epoch=1, iteration=step, epoch_length=30, max_epochs=1))
        if step % 10 == 0:
            sinks.log_metrics({"train/loss": 1.0 / step}, step, 1)
    sinks.close("FINISHED")
    os.makedirs(a.report_dir, exist_ok=True)
    with open(os.path.join(a.report_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump({"rank": rt.rank, "run_id": run_id,
                   "mlflow_imported": any(m.split(".")[0] == "mlflow" for m in sys.modules)}, f)
    rt.barrier()
    shutdown_runtime()
    exit_process(0, distributed=True)


if __name__ == "__main__":
    main()
