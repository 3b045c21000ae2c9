"""`ig.train` under --strategy fsdp, end to end on 2-rank gloo jobs: the digits example learns as well as
under DDP, a SIGTERM mid-epoch then resume ends bitwise identical to an uninterrupted run, checkpoints
resume across strategies and world sizes (2 -> 3 under ddp, 2 -> 1, ddp -> fsdp), and evaluation over
uneven shards (25 samples, batches of 4: 4 batches on rank 0, 3 on rank 1) counts every sample once,
checkpoints on S3 follow --n-saved and --keep-best with MLflow on; the GPT example learns under fsdp and ddp.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid

import pytest
import torch
from test_checkpoint import folders
from test_resume import committed_steps, final_reports, probe_args
from torch import nn

from launch import ROOT, check, python, torchrun

PROBE = ROOT / "tests" / "workers" / "resume_probe.py"
DIGITS = ROOT / "examples" / "digits" / "train.py"
GPT = ROOT / "examples" / "gpt" / "train.py"
FSDP = ["--strategy", "fsdp", "--precision", "bf16-mixed", "--n-eval", "25", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank fsdp run in bf16-mixed (3 epochs of 6 steps), its folder with the checkpoints."""
    tmp = tmp_path_factory.mktemp("fsdp-reference")
    check(torchrun(PROBE, probe_args(tmp, "r", *FSDP)))
    reports = final_reports(tmp / "r")
    assert len(reports) == 2 and reports[0]["digest"] == reports[1]["digest"]
    return tmp, reports[0]


def accuracy(result) -> float:
    found = re.search(r"final eval accuracy ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:]
    return float(found.group(1))


def test_bf16_mixed_gathers_parameters_in_bfloat16(reference):
    assert reference[1]["compute_dtypes"] == ["torch.bfloat16"]  # --precision reached FSDP's policy


def test_uneven_evaluation_shards_count_every_sample_once(reference):
    _, report = reference
    assert report["metrics"]["eval/count"] == 25.0  # no sample dropped, none counted twice
    assert report["metrics"]["eval/index"] == 12.0  # the mean of 0..24: the replayed batch was not counted


def test_sigterm_mid_epoch_then_resume_ends_bitwise_identical(tmp_path, reference):
    """The interrupted run saves in the background (each rank stages its own shards)."""
    first = torchrun(PROBE, probe_args(tmp_path, "first", *FSDP, "--interrupt-at", "8", "--async-checkpoint", "true"))
    assert first.returncode != 0
    assert first.stderr.count("stopped by SIGTERM; exiting with 143") == 2, first.stderr[-3000:]
    saved = committed_steps(tmp_path / "ckpt")[-1]
    assert 8 <= saved <= 10 and saved % 6  # mid-epoch
    second = check(torchrun(PROBE, probe_args(tmp_path, "second", *FSDP)))
    assert f"resumed from {tmp_path / 'ckpt'}/step_{saved:010d}" in second.stderr
    assert [r["digest"] for r in final_reports(tmp_path / "second")] == [reference[1]["digest"]] * 2


@pytest.mark.parametrize("ranks,strategy", [(3, "ddp"), (1, "fsdp")])
def test_an_fsdp_checkpoint_resumes_on_another_world_size_and_strategy(tmp_path, reference, ranks, strategy):
    shutil.copytree(reference[0] / "ckpt", tmp_path / "ckpt")
    args = probe_args(tmp_path, "more", *FSDP, "--strategy", strategy, "--max-epochs", "4")
    result = check(torchrun(PROBE, args, nproc=ranks) if ranks > 1 else python(PROBE, args))
    assert (f"resumed from {tmp_path / 'ckpt'}/step_0000000018 (step 18, after epoch 3, "
            f"resharded from 2 to {ranks} ranks)") in result.stderr
    assert committed_steps(tmp_path / "ckpt")[-1] > 18
    assert {r["metrics"]["eval/count"] for r in final_reports(tmp_path / "more")} == {25.0}


def test_debug_mode_checks_replicas_and_round_trips_a_sharded_checkpoint(tmp_path):
    result = check(torchrun(PROBE, probe_args(tmp_path, "debug", "--strategy", "fsdp", "--debug", "true")))
    assert "step 1: every parameter is sharded, so there are no replicas to compare" in result.stderr
    assert "checkpoint round trip ok: step 4 saved and loaded back" in result.stderr


@pytest.mark.usefixtures("clean_mlflow_env")
def test_s3_checkpoints_retention_mlflow_and_safetensors_export_under_fsdp(tmp_path, s3_bucket, mlflow_server):
    """One fsdp run with its checkpoints on S3 (moto), --n-saved 1 and --keep-best, MLflow on, and the final
    model exported as model.pt and model.safetensors (the same full tensors, gathered from the shards)."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    url, name = f"{s3_bucket}/ckpt", f"fsdp-{uuid.uuid4().hex[:8]}"
    check(torchrun(PROBE, ["--report-dir", str(tmp_path / "r"), "--checkpoint-dir", url, "--output-dir",
                           str(tmp_path / "out"), *FSDP, "--n-saved", "1", "--keep-best", "eval/loss:min",
                           "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment-name", name,
                           "--model-safetensors", "true"]))
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval/loss"] for r in history if "eval/loss" in r}
    assert sorted(losses) == [6, 12, 18]
    best = min(losses, key=losses.__getitem__)
    assert {s for s, committed in folders(url).items() if committed} == {f"step_{s:010d}" for s in {best, 18}}
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == f"{url}/step_0000000018"
    tracked = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step: m.value for m in tracked} == pytest.approx(losses)
    exported = torch.load(tmp_path / "out" / "model" / "model.pt", weights_only=True)  # gathered from the shards
    nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 2)).load_state_dict(exported)
    safetensors = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert safetensors.keys() == exported.keys() and all(torch.equal(safetensors[k], exported[k]) for k in exported)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits example, 3 epochs on 2 ranks, under ddp and under fsdp."""
    tmp = tmp_path_factory.mktemp("digits")
    runs = {s: check(torchrun(DIGITS, ["--strategy", s, "--max-epochs", "3", "--output-dir", str(tmp / s)]))
            for s in ("ddp", "fsdp")}
    return tmp, runs


def test_the_digits_example_learns_under_fsdp_as_under_ddp(digits):
    _, runs = digits
    assert accuracy(runs["fsdp"]) > 0.9
    assert accuracy(runs["fsdp"]) == pytest.approx(accuracy(runs["ddp"]), abs=0.01)


def test_a_ddp_checkpoint_resumes_under_fsdp(digits):
    tmp, _ = digits
    saved = committed_steps(tmp / "ddp" / "checkpoints")[-1]
    result = check(torchrun(DIGITS, ["--strategy", "fsdp", "--max-epochs", "4", "--output-dir", str(tmp / "ddp")]))
    assert f"resumed from {tmp / 'ddp' / 'checkpoints'}/step_{saved:010d}" in result.stderr
    assert accuracy(result) > 0.9
    state = torch.load(tmp / "ddp" / "model" / "model.pt", weights_only=True)  # gathered from the shards
    nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, 10)).load_state_dict(state)


@pytest.mark.parametrize("ranks,strategy", [(2, "fsdp"), (1, "ddp")])
def test_the_gpt_example_learns_under_fsdp_and_ddp(tmp_path, ranks, strategy):
    """A tiny GPT over the repository's docs, 10 steps from a meta-device build: below the uniform 5.55 nats."""
    args = ["--strategy", strategy, "--max-epochs", "1", "--epoch-length", "10", "--n-layer", "1", "--n-embd", "32",
            "--n-head", "2", "--checkpoint-dir", "none", "--output-dir", str(tmp_path)]
    result = check(torchrun(GPT, args, nproc=ranks) if ranks > 1 else python(GPT, args))
    found = re.search(r"final eval loss ([0-9.]+) nats per byte", result.stdout)
    assert found and float(found.group(1)) < 5.3, result.stdout[-2000:]


def test_the_gpu_sync_check_runs_its_window_under_fsdp_on_cpu(tmp_path):
    """scripts/gpu_check.sh runs scripts/gpu_sync_check.py under fsdp and bf16-mixed on a lent GPU machine;
    here, on CPU, every rank must still run the checked window (and claim nothing about CUDA)."""
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    result = check(torchrun(ROOT / "scripts" / "gpu_sync_check.py", [
        "--device", "cpu", "--strategy", "fsdp", "--precision", "bf16-mixed", "--max-epochs", "1", "--batch-size", "8",
        "--output-dir", str(tmp_path)]))
    assert result.stdout.count("steps 20..60 ran; synchronisation not checked without CUDA") == 2
    assert "no host synchronisation" not in result.stdout
