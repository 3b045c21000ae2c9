"""The engine for real: plain python and 2-rank torchrun runs of the example and of a probe script."""

import json
import re
from pathlib import Path

import pytest
import torch

from launch import ROOT, check, python, torchrun

EXAMPLE = ROOT / "examples" / "digits" / "train.py"
PROBE = ROOT / "tests" / "workers" / "engine_probe.py"


def reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def final_accuracy(stdout: str) -> float:
    m = re.search(r"final eval accuracy ([0-9.]+)", stdout)
    assert m, stdout[-3000:]
    return float(m.group(1))


def example_args(tmp_path: Path) -> list[str]:
    return ["--max-epochs", "10", "--output-dir", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")]


def test_example_single_process_reaches_90_percent(tmp_path):
    result = check(python(EXAMPLE, example_args(tmp_path)))
    assert final_accuracy(result.stdout) > 0.9
    assert (tmp_path / "out" / "model" / "model.pt").exists()


def test_example_two_ranks_reaches_90_percent(tmp_path):
    result = check(torchrun(EXAMPLE, [*example_args(tmp_path), "--model-safetensors", "true"], nproc=2))
    assert final_accuracy(result.stdout) > 0.9
    assert result.stdout.count("final eval accuracy") == 1  # printed by rank 0 only
    from safetensors.torch import load_file

    pt = torch.load(tmp_path / "out" / "model" / "model.pt", weights_only=True)
    st = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert pt.keys() == st.keys() and not any(k.startswith("module.") for k in st)
    assert all(torch.equal(pt[k], st[k]) for k in pt)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    check(torchrun(PROBE, ["--report-dir", str(tmp / "r"), "--checkpoint-dir", "none", "--output-dir",
                           str(tmp / "out"), "--max-epochs", "2", "--n-train", "64", "--n-eval", "37"], nproc=2))
    return reports(tmp / "r")


def test_ddp_keeps_parameters_bitwise_identical_across_ranks(two_rank_run):
    r0, r1 = two_rank_run
    assert r0["digest"] == r1["digest"]


def test_each_epoch_covers_the_training_set_once_with_disjoint_shards(two_rank_run):
    r0, r1 = two_rank_run
    for epoch in ("0", "1"):
        a, b = r0["seen_train"][epoch], r1["seen_train"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(64))
    assert r0["seen_train"]["0"] != r0["seen_train"]["1"]  # reshuffled per epoch


def test_evaluation_sees_every_sample_exactly_once(two_rank_run):
    r0, r1 = two_rank_run
    evals = 2  # one evaluation per epoch; 37 samples do not divide by 2 ranks x 8
    seen = sorted(r0["seen_eval"] + r1["seen_eval"])
    assert seen == sorted(list(range(37)) * evals)


def test_metrics_are_identical_on_every_rank(two_rank_run):
    r0, r1 = two_rank_run
    assert r0["metrics"] == r1["metrics"]


def test_an_unprepared_model_is_refused_on_two_ranks(tmp_path):
    args = ["--mode", "unprepared", "--report-dir", str(tmp_path), "--checkpoint-dir", "none"]
    result = torchrun(PROBE, args, nproc=2)
    assert result.returncode != 0
    assert "ig.prepare(model)" in result.stderr and "2 ranks" in result.stderr


def test_a_step_returning_a_string_is_refused(tmp_path):
    result = python(PROBE, ["--mode", "bad-step", "--report-dir", str(tmp_path), "--checkpoint-dir", "none",
                            "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert "The train step returned a str; it must return a dict" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "-3"], "--batch-size"),
    (["--device", "tpu9"], "--device 'tpu9'"),
    (["--resume", "maybe"], "--resume"),
])
def test_bad_flags_exit_2_with_one_clear_line(tmp_path, flags, message):
    result = python(EXAMPLE, [*flags, "--output-dir", str(tmp_path)])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
