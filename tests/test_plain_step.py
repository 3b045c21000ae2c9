"""The README's plain step honours the step flags on 2 ranks, or is refused before any optimizer step (issue 18)."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig
from igniter_dist.errors import ConfigError
from igniter_dist.runtime import Runtime
from igniter_dist.steps import GradientStepper, StepOptions
from launch import ROOT, check, python, torchrun

PROBE = ROOT / "tests" / "workers" / "plain_step_probe.py"
HELPERS_SENTENCE = ("use engine.backward(loss) and engine.optimizer_step(optimizer) in your train step, "
                    "as in docs/howto/precision.md.")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Every variant of plain_step_probe.py trained in one 2-rank launch: {rank: {variant: report}}."""
    folder = tmp_path_factory.mktemp("plain_step")
    check(torchrun(PROBE, ["--report-dir", str(folder), "--output-dir", str(folder / "out")]))
    return {rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def params(report):
    return {name: torch.tensor(value) for name, value in report["params"].items()}


def assert_close(a, b):
    # SGD with momentum over 4 steps; the only difference is where 1/3 is applied: (g1+g2+g3)/3 vs g1/3+g2/3+g3/3
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["plain3", "plain3_zero", "plain3_clip"])
def test_plain_step_keeps_the_replicas_bitwise_identical(variants, variant):
    zero, one = params(variants[0][variant]), params(variants[1][variant])
    assert all(torch.equal(zero[name], one[name]) for name in zero)


def test_plain_step_accumulates_like_the_helpers_and_the_bigger_batch(variants):
    """--accumulate-grad-batches 3: optimizer.zero_grad() at every micro-step is kept to the window's end."""
    report = variants[0]
    # 48 samples, 2 ranks, 2 epochs: 4 optimizer steps of 3 x 4 samples per rank, as with batches of 12
    assert report["plain3"]["steps"] == report["helpers3"]["steps"] == report["big"]["steps"] == 4
    assert_close(params(report["plain3"]), params(report["helpers3"]))
    assert_close(params(report["plain3"]), params(report["big"]))


def test_model_zero_grad_inside_a_window_does_not_wipe_it(variants):
    """model.zero_grad() on the DDP wrapper and on the module inside, between backward and step."""
    report = variants[0]
    assert report["plain3_zero"]["steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(params(report["plain3_zero"]).values(),
                                                 params(report["plain3"]).values(), strict=True))


def test_plain_step_clips_exactly_as_the_helpers(variants):
    report = variants[0]
    clipped, helpers = params(report["plain3_clip"]), params(report["helpers3_clip"])
    assert_close(clipped, helpers)
    unclipped = params(report["plain3"])
    assert max((clipped[n] - unclipped[n]).abs().max().item() for n in clipped) > 0.1  # clipping changed the run


def test_16_mixed_with_a_plain_backward_stops_before_the_first_optimizer_step(tmp_path):
    result = torchrun(PROBE, ["--single", "plain", "--precision", "16-mixed", "--accumulate-grad-batches", "2",
                              "--checkpoint-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out")])
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    sentence = ("error: --precision 16-mixed needs the loss scaled by engine.backward(loss), but the train step "
                f"reached SGD.step() after a plain loss.backward(); {HELPERS_SENTENCE}")
    assert f"[rank 0] {sentence}" in result.stderr and f"[rank 1] {sentence}" in result.stderr
    assert "the optimizer stepped" not in result.stderr  # no optimizer step ran on either rank
    assert not list((tmp_path / "ckpt").glob("step_*"))  # nothing saved


def test_an_optimizer_outside_to_save_is_refused_while_accumulating(tmp_path):
    result = python(PROBE, ["--single", "foreign", "--accumulate-grad-batches", "2", "--output-dir", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: The train step stepped a SGD that is not in to_save, so --accumulate-grad-batches 2 cannot apply "
        "to it; add it to to_save (then it is checkpointed too) or step it with engine.optimizer_step(optimizer).")


def test_the_wrappers_leave_the_users_objects_as_they_were():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)  # patches opt.step itself: kept inside ours
    before = (vars(opt)["step"], "zero_grad" in vars(opt), "zero_grad" in vars(model))
    stepper = GradientStepper(StepOptions(accumulate_grad_batches=2, grad_clip_norm=1.0), Runtime(), [model], [opt])
    with stepper.attached():
        assert opt.step is not before[0] and hasattr(opt.step, "_wrapped_by_lr_sched")
        for i in range(2):
            with stepper.micro_step(i, None):
                opt.zero_grad()
                model(torch.ones(1, 3)).sum().backward()
                opt.step()
        assert all(p.grad is None for p in model.parameters())  # zeroed at the window's end
    assert (vars(opt)["step"], "zero_grad" in vars(opt), "zero_grad" in vars(model)) == before
    assert vars(opt)["_opt_called"]  # the scheduler saw the real step
    scheduler.step()


def test_16_mixed_refusal_in_a_later_step_stops_at_once():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = GradientStepper(StepOptions(precision="16-mixed"), Runtime(), [model], [opt])
    with stepper.attached():
        with stepper.micro_step(0, None):
            stepper.backward(model(torch.ones(1, 3)).sum())
            assert stepper.optimizer_step(opt)
        with pytest.raises(ConfigError, match="plain loss.backward"), stepper.micro_step(1, None):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()


def test_a_checkpoint_of_a_stateless_optimizer_is_no_training_step(tmp_path):
    """DCP steps plain SGD (no state) with lr 0 at every save; that must not reach the loss scaler."""

    def run(checkpoint_dir):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = []

        def step(engine, batch):
            seen.append(engine.stepper.scaler)
            loss = model(batch[0]).pow(2).mean()
            engine.backward(loss)
            engine.optimizer_step(opt)
            return {"loss": loss}

        ig.train({"model": model, "optimizer": opt},
                 ig.RunSpec(step=step, loader=DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2),
                            metrics={"loss": "loss"}),
                 max_epochs=3, precision="16-mixed", checkpoint_dir=checkpoint_dir, output_dir=str(tmp_path),
                 console=False)
        return seen[-1].state_dict(), model.state_dict()

    saved_scaler, saved_model = run(str(tmp_path / "ckpt"))
    assert len(list((tmp_path / "ckpt").glob("step_*"))) == 2  # saved after each epoch, the last two kept
    scaler, model = run("none")
    assert saved_scaler == scaler
    assert all(torch.equal(saved_model[k], model[k]) for k in model)


def test_a_foreign_optimizer_is_refused_under_clipping_alone(tmp_path):
    """Full precision, no accumulation: the loop's fast path must still agree on a refused step."""
    model = nn.Linear(4, 2)
    opt, other = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        loss = model(batch[0]).pow(2).mean()
        loss.backward()
        other.step()
        return {"loss": loss}

    refused = r"^The train step stepped a SGD that is not in to_save, so --grad-clip-norm 1.0 cannot apply to it"
    with pytest.raises(ConfigError, match=refused):
        ig.train({"model": model, "optimizer": opt},
                 ig.RunSpec(step=step, loader=DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2),
                            metrics={"loss": "loss"}),
                 max_epochs=1, grad_clip_norm=1.0, checkpoint_dir="none", output_dir=str(tmp_path), console=False)
