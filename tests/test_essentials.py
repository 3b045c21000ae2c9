"""Training essentials: accumulation under DDP, mixed precision, clipping, debug mode."""

import json
import re

import pytest
import torch
from torch import nn

from igniter_dist.errors import ConfigError
from igniter_dist.runtime import Runtime
from igniter_dist.steps import GradientStepper, StepOptions
from launch import ROOT, check, python, torchrun

ESSENTIALS = ROOT / "tests" / "workers" / "essentials_probe.py"
RESUME = ROOT / "tests" / "workers" / "resume_probe.py"
EXAMPLE = ROOT / "examples" / "digits" / "train.py"


def report(folder):
    return json.loads((folder / "rank0.json").read_text())


def test_accumulating_4_micro_batches_equals_a_4x_batch_with_one_allreduce_per_step(tmp_path):
    common = ["--output-dir", str(tmp_path / "out")]
    check(torchrun(ESSENTIALS, ["--report-dir", str(tmp_path / "big"), "--batch-size", "16", *common]))
    check(torchrun(ESSENTIALS, ["--report-dir", str(tmp_path / "acc"), "--batch-size", "4",
                                "--accumulate-grad-batches", "4", *common]))
    big, acc = report(tmp_path / "big"), report(tmp_path / "acc")
    for name, values in big["params"].items():
        torch.testing.assert_close(torch.tensor(acc["params"][name]), torch.tensor(values), rtol=1e-5, atol=1e-6)
    # 64 samples / 2 ranks / 16 per step = 2 optimizer steps; 8 micro-steps all-reduce only twice
    assert big["allreduces"] == 2 and acc["allreduces"] == 2


def test_bf16_mixed_trains_the_example_above_90_percent(tmp_path):
    result = check(python(EXAMPLE, ["--precision", "bf16-mixed", "--max-epochs", "10",
                                    "--output-dir", str(tmp_path), "--checkpoint-dir", "none"]))
    found = re.search(r"final eval accuracy ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:]
    accuracy = float(found.group(1))
    assert accuracy > 0.9


def test_gpu_sync_check_script_runs_its_schedule_on_cpu(tmp_path):
    """scripts/gpu_sync_check.py waits for a lent GPU; on CPU it must still run its window of steps."""
    result = check(python(ROOT / "scripts" / "gpu_sync_check.py",
                          ["--device", "cpu", "--max-epochs", "1", "--output-dir", str(tmp_path)]))
    assert "steps 20..60 ran; synchronisation not checked without CUDA" in result.stdout
    assert "no host synchronisation" not in result.stdout  # never claimed without CUDA


def test_16_mixed_scaler_state_survives_a_resume_bitwise(tmp_path):
    args = ["--precision", "16-mixed", "--engine-helpers", "true", "--max-epochs", "2"]

    def run(name, ckpt, *extra):
        return torchrun(RESUME, ["--report-dir", str(tmp_path / name), "--checkpoint-dir", str(tmp_path / ckpt),
                                 "--output-dir", str(tmp_path / "out"), *args, *extra])

    check(run("reference", "c1"))
    first = run("first", "c2", "--interrupt-at", "8")
    assert first.returncode != 0 and "exiting with 143" in first.stderr
    check(run("second", "c2"))
    ref = json.loads(next((tmp_path / "reference").glob("rank0*.json")).read_text())
    resumed = json.loads(next((tmp_path / "second").glob("rank0*.json")).read_text())
    assert ref["scaler"] is not None and resumed["scaler"] == ref["scaler"]
    assert resumed["digest"] == ref["digest"]


class RecordingSGD(torch.optim.SGD):
    norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step(closure)


def test_clipping_bounds_the_total_gradient_norm():
    model = nn.Linear(10, 10)
    opt = RecordingSGD(model.parameters(), lr=0.1)
    stepper = GradientStepper(StepOptions(grad_clip_norm=0.5), Runtime(), [model])
    with stepper.micro_step(0, None):
        loss = (model(torch.randn(8, 10)) * 1000).pow(2).mean()
        stepper.backward(loss)
    unclipped = float(torch.linalg.vector_norm(torch.stack([_grad(p).norm() for p in model.parameters()])))
    assert unclipped > 10
    assert stepper.optimizer_step(opt)
    assert opt.norms[-1] <= 0.5 + 1e-5
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_clip_value_bounds_every_element():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = GradientStepper(StepOptions(grad_clip_value=0.01), Runtime(), [model])
    captured: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: captured.extend(_grad(p).abs().max().item() for p in model.parameters()))
    with stepper.micro_step(0, None):
        stepper.backward((model(torch.randn(3, 4)) * 100).sum())
    stepper.optimizer_step(opt)
    assert max(captured) <= 0.01 + 1e-7


def test_bad_step_options_are_refused():
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        StepOptions(precision="fp8")  # type: ignore[arg-type]  # the wrong value is the test
    with pytest.raises(ConfigError, match="--accumulate-grad-batches"):
        StepOptions(accumulate_grad_batches=0)


def test_debug_mode_is_fast_prints_summaries_and_round_trips_a_checkpoint(tmp_path):
    result = check(torchrun(EXAMPLE, ["--debug", "true", "--output-dir", str(tmp_path)]))
    err = result.stderr
    assert "igniter-dist debug: model model: Sequential, 9,610 parameters" in err
    assert "train 4 of 23 batches per epoch per rank" in err
    assert "parameters agree on all 2 ranks" in err
    assert "checkpoint round trip ok: step 4" in err
    assert re.findall(r"epoch 2/2 step 8 \| eval/", result.stdout)


def test_debug_mode_fails_clearly_when_replicas_diverge(tmp_path):
    result = torchrun(ESSENTIALS, ["--report-dir", str(tmp_path), "--debug", "true", "--diverge", "true",
                                   "--output-dir", str(tmp_path / "out")])
    assert result.returncode != 0
    assert "After step 1 the ranks hold different values of model.0.bias" in result.stderr


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad
