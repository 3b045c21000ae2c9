"""Per-step cost of metric accumulation against a raw loop that accumulates nothing (issue 3).

One process, the MLP workload, batches prepared in advance so only the step and the metric
update are timed. Variants run in interleaved rounds (raw, X, raw, Y, ...).

    .venv/bin/python benchmarks/metrics/bench.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "overhead"))

import torch
import torchmetrics
from harness import OUT, RAW, machine, markdown_table, ratios, schedule, spread, write_json
from torch import nn
from workloads import BATCH_SIZE, LEARNING_RATE, WORKLOADS

import igniter_dist as ig
from igniter_dist.metrics import MetricSet

Update = Callable[[dict[str, torch.Tensor]], None]


def accuracy() -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(num_classes=10)


def make_update(name: str) -> Update:
    """The per-step accumulation of one variant, as a function of the step's outputs."""
    cpu = torch.device("cpu")
    if name == RAW:
        return lambda out: None
    if name == "hand-written sum":
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)

        def update(out: dict[str, torch.Tensor]) -> None:
            total.add_(out["loss"].detach() * BATCH_SIZE)
            count.add_(BATCH_SIZE)
        return update
    if name == "torchmetrics mean + accuracy":
        mean, acc = torchmetrics.MeanMetric(), accuracy()

        def update(out: dict[str, torch.Tensor]) -> None:
            mean.update(out["loss"].detach(), weight=BATCH_SIZE)
            acc.update(out["logits"].detach(), out["labels"])
        return update
    specs: dict = {"loss": "loss"}
    if name == "ig string mean + accuracy":
        specs["accuracy"] = ig.Metric(accuracy(), "logits", "labels")
    metrics = MetricSet(specs, cpu, distributed=False)
    return lambda out: metrics.update(out, BATCH_SIZE)


VARIANTS = ["hand-written sum", "ig string mean", "ig string mean + accuracy", "torchmetrics mean + accuracy"]


def timed_run(name: str, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(1)
    workload = WORKLOADS["mlp"]
    model = workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.CrossEntropyLoss()
    data = workload.dataset((steps + warmup) * BATCH_SIZE).tensors
    batches = list(zip(data[0].split(BATCH_SIZE), data[1].split(BATCH_SIZE), strict=True))
    update = make_update(name)
    totals, updates = [], []
    for inputs, labels in batches:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        logits = model(inputs)
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        update({"loss": loss, "logits": logits, "labels": labels})
        t2 = time.perf_counter()
        totals.append(t2 - t0)
        updates.append(t2 - t1)
    return {"median_s": statistics.median(totals[warmup:]), "update_us": 1e6 * statistics.median(updates[warmup:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="One short round: a smoke check.")
    args = p.parse_args()
    rounds, steps, warmup = (1, 60, 10) if args.quick else (6, 250, 30)
    torch.set_num_threads(1)
    runs: list[dict[str, Any]] = []
    for position, (rnd, name) in enumerate(schedule(VARIANTS, rounds)):
        runs.append({"round": rnd, "position": position, "impl": name, **timed_run(name, steps, warmup)})
    by_ratio = ratios(runs)
    rows = []
    for name in [RAW, *VARIANTS]:
        mine = [r for r in runs if r["impl"] == name]
        step_ms = statistics.median(r["median_s"] for r in mine) * 1e3
        update_us = statistics.median(r["update_us"] for r in mine)
        label = "raw loop, no metrics (noise floor)" if name == RAW else name
        rows.append([label, f"{step_ms:.3f}", f"{update_us:.1f}", spread(by_ratio.get(name, []))])
    table = (f"### Metric accumulation, MLP, batch {BATCH_SIZE}, 1 process, {steps} steps x {rounds} round(s)\n\n"
             + markdown_table(["per step", "step + update ms", "update us", "ratio to raw (range)"], rows))
    write_json(OUT / "metrics.json", {"machine": machine(), "steps": steps, "rounds": rounds, "runs": runs})
    (OUT / "metrics.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
