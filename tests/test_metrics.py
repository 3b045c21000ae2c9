"""Metrics are exact across ranks: 2 ranks with uneven shards give the single-process values."""

import json

import pytest
import torch

from igniter_dist.errors import ConfigError, StepOutputError
from igniter_dist.metrics import Metric, MetricSet
from launch import ROOT, check, python, torchrun

PROBE = ROOT / "tests" / "workers" / "engine_probe.py"


def run_metrics(tmp_path, nproc):
    args = ["--mode", "metrics", "--report-dir", str(tmp_path / f"n{nproc}"), "--n-eval", "37",
            "--eval-batch-size", "5", "--checkpoint-dir", "none", "--output-dir", str(tmp_path / "out")]
    check(torchrun(PROBE, args, nproc=nproc) if nproc > 1 else python(PROBE, args))
    return [json.loads(p.read_text())["metrics"] for p in sorted((tmp_path / f"n{nproc}").glob("rank*.json"))]


def test_two_rank_metrics_equal_single_process_values(tmp_path):
    (single,) = run_metrics(tmp_path, 1)
    two = run_metrics(tmp_path, 2)
    assert two[0] == two[1]
    for name, value in single.items():
        assert two[0][name] == pytest.approx(value, abs=1e-6), name
    assert single["eval/value"] == pytest.approx(18.0)  # mean of sample ids 0..36
    assert single["eval/double"] == pytest.approx(36.0)
    # a per-batch mean weighted by batch size and per-sample values give the same dataset mean
    assert single["eval/loss"] == pytest.approx(single["eval/per_sample"], abs=1e-6)


def test_batch_mean_and_per_sample_outputs_weigh_samples_equally():
    ms = MetricSet({"a": "loss", "b": "per_sample"}, torch.device("cpu"), distributed=False)
    for values in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])):
        ms.update({"loss": values.mean(), "per_sample": values}, batch_size=len(values))
    out = ms.compute()
    assert out["a"] == pytest.approx(4.0) and out["b"] == pytest.approx(4.0)


def test_missing_output_key_names_the_key_and_what_was_returned():
    ms = MetricSet({"acc": "accuracy"}, torch.device("cpu"), distributed=False)
    with pytest.raises(StepOutputError, match=r"Metric 'acc' reads output 'accuracy'.*returned 'loss'"):
        ms.update({"loss": torch.tensor(1.0)}, 4)


def test_non_numeric_output_is_refused():
    ms = MetricSet({"loss": "loss"}, torch.device("cpu"), distributed=False)
    with pytest.raises(StepOutputError, match="'loss'.*str"):
        ms.update({"loss": "high"}, 4)


def test_metric_objects_must_be_torchmetrics():
    with pytest.raises(ConfigError, match="torchmetrics.Metric instance"):
        Metric(object(), "logits")
    with pytest.raises(ConfigError, match="expected an output key"):
        MetricSet({"x": 3}, torch.device("cpu"), distributed=False)  # type: ignore[dict-item]  # the wrong type is the test


def test_accumulators_round_trip_through_state_dict():
    import torchmetrics

    a = MetricSet({"loss": "loss", "acc": Metric(torchmetrics.classification.MulticlassAccuracy(3), "p", "t")},
                  torch.device("cpu"), distributed=False)
    a.update({"loss": torch.tensor(2.0), "p": torch.tensor([0, 1, 2]), "t": torch.tensor([0, 1, 1])}, 3)
    b = MetricSet({"loss": "loss", "acc": Metric(torchmetrics.classification.MulticlassAccuracy(3), "p", "t")},
                  torch.device("cpu"), distributed=False)
    b.load_state_dict(a.state_dict())
    assert b.compute() == a.compute()


def test_means_stay_exact_across_buffer_folds_batch_sizes_and_reused_output_memory():
    import math
    import random

    ms = MetricSet({"loss": "loss"}, torch.device("cpu"), distributed=False)
    rng = random.Random(0)
    out = torch.zeros(())  # one output tensor the step overwrites each time, as CUDA graphs do
    expected, samples = [], 0
    for i in range(200):  # three folds of the 64-slot buffer, batch sizes changing in between
        size = 3 if i % 37 == 36 else (8 if i < 120 else 5)
        out.fill_(rng.uniform(0, 10))
        fed = out if i % 3 else (out.item() if i % 2 else out.reshape(1))  # a tensor, a number, a 1-element tensor
        ms.update({"loss": fed}, batch_size=size)
        expected.append(float(fed) * size)
        samples += size
    assert ms.compute()["loss"] == pytest.approx(math.fsum(expected) / samples, rel=1e-13)


def test_a_mean_saved_mid_buffer_resumes_to_the_same_bits():
    def feed(ms, values):
        for v in values:
            ms.update({"loss": torch.tensor(v)}, batch_size=4)

    values = [0.1 * i + 0.01 for i in range(90)]
    whole = MetricSet({"loss": "loss"}, torch.device("cpu"), distributed=False)
    feed(whole, values)
    first = MetricSet({"loss": "loss"}, torch.device("cpu"), distributed=False)
    feed(first, values[:70])  # one fold at 64, six values still buffered
    resumed = MetricSet({"loss": "loss"}, torch.device("cpu"), distributed=False)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, values[70:])
    assert resumed.compute() == whole.compute()
