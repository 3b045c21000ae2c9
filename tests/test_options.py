"""One description of the options: the parser's flags, `train_kwargs` and `ig.train`'s keywords agree."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from torch import nn

import igniter_dist as ig
from igniter_dist.args import STANDARD, build_parser, parse_args, train_kwargs
from igniter_dist.errors import ConfigError
from igniter_dist.options import described, flag, from_keywords
from igniter_dist.schedule import Every
from igniter_dist.steps import StepOptions
from igniter_dist.training import TrainOptions

# Every keyword ig.train took before the options had one description, with its default then.
TRAIN_KEYWORDS = {
    "max_epochs": None, "epoch_length": None, "seed": 1, "eval_every": 1, "log_every": 50, "checkpoint_dir": None,
    "resume": True, "resume_from": None, "init_from": None, "save_every": 1, "n_saved": 2, "keep_best": None,
    "save_every_minutes": None,
    "async_checkpoint": False, "on_checkpoint_error": "stop", "output_dir": "output", "model_dir": None,
    "model_safetensors": False, "parameters": None, "mlflow": None, "console": True, "precision": "32",
    "accumulate_grad_batches": 1, "grad_clip_norm": None, "grad_clip_value": None, "debug": False,
    "stop_check_every": 10, "max_steps": None,
}


def test_every_standard_flag_is_a_field_of_an_options_class():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    fields = {flag(f.name) for cls in STANDARD for f, opt in described(cls) if opt.group}
    assert flags == fields
    helps = {a.option_strings[0]: a.help for a in parser._actions}
    assert helps["--precision"] == dict((f.name, o.help) for f, o in described(StepOptions))["precision"]


def test_train_keeps_every_keyword_with_its_default():
    params = inspect.signature(ig.train).parameters
    for name, default in TRAIN_KEYWORDS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == (Every(1) if name in ("eval_every", "save_every") else default), name
    assert "Flag: ``--max-epochs``" in (ig.train.__doc__ or "")


def test_the_api_reference_describes_every_parameter_of_train():
    doc = ig.train.__doc__ or ""
    for name in inspect.signature(ig.train).parameters:
        if name != "options":
            assert re.search(rf"^    {name}( \(.*\))?: \S", doc, re.M), name


def test_train_kwargs_are_the_flags_of_the_train_and_step_options():
    kw = train_kwargs(parse_args(build_parser(), ["--precision", "bf16-mixed", "--eval-every", "500steps"]))
    flagged = {f.name for cls in (TrainOptions, StepOptions) for f, opt in described(cls) if opt.group}
    assert set(kw) == flagged | {"mlflow"} == set(TRAIN_KEYWORDS) - {"parameters", "console"}
    assert kw["precision"] == "bf16-mixed" and kw["eval_every"] == Every(500, "steps") and kw["max_epochs"] == 10
    options = TrainOptions(**{k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(TrainOptions)}})
    assert options.mlflow is not None and not options.mlflow.enable


def test_values_given_in_python_are_checked_and_normalised_like_flags():
    options, steps = from_keywords("ig.train", {"eval_every": "500steps", "save_every": 2, "resume": "false",
                                                "accumulate_grad_batches": "4"}, TrainOptions, StepOptions)
    assert (options.eval_every, options.save_every, options.resume) == (Every(500, "steps"), Every(2), False)
    assert steps.accumulate_grad_batches == 4
    with pytest.raises(ConfigError, match=r"^--n-saved must be a positive integer, got 0\.$"):
        TrainOptions(n_saved=0)
    with pytest.raises(ConfigError, match=r"^--on-checkpoint-error 'later' is not supported; use one of stop, warn\.$"):
        from_keywords("ig.train", {"on_checkpoint_error": "later"}, TrainOptions)


def _run(calls: list[int]) -> tuple[dict[str, object], ig.RunSpec]:
    """A tiny linear regression: its `to_save` and a RunSpec whose step records each step it runs."""
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randn(20, 1))

    def step(engine, batch):
        calls.append(engine.state.step)
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    loader = torch.utils.data.DataLoader(data, batch_size=4)
    return {"model": model, "optimizer": optimizer}, ig.RunSpec(step=step, loader=loader, metrics={"loss": "loss"})


def test_an_unknown_keyword_names_the_close_match():
    to_save, spec = _run([])
    with pytest.raises(ConfigError, match=r"^ig\.train\(\) got an unknown keyword 'max_epoch'; did you mean "
                                          r"max_epochs\?$"):
        ig.train(to_save, spec, max_epoch=2)


def test_train_leaves_the_users_run_spec_as_given(tmp_path):
    calls: list[int] = []
    to_save, spec = _run(calls)
    ig.train(to_save, spec, max_epochs=2, epoch_length=3, checkpoint_dir="none", output_dir=str(tmp_path),
             console=False)
    assert calls == [0, 1, 2, 3, 4, 5]  # 2 epochs of 3 iterations
    assert (spec.max_epochs, spec.epoch_length) == (None, None)


def test_prepare_follows_the_flags_igniter_main_parsed_unless_the_script_says():
    seen = {}

    def main(args):
        seen["flag"] = ig.prepare(nn.Linear(2, 2))
        seen["script"] = ig.prepare(nn.Linear(2, 2), compile=False)

    with pytest.raises(SystemExit) as exit_:
        ig.igniter_main(main, argv=["--compile", "true", "--device", "cpu"])
    assert exit_.value.code == 0
    assert hasattr(seen["flag"], "_orig_mod") and not hasattr(seen["script"], "_orig_mod")
    assert not hasattr(ig.prepare(nn.Linear(2, 2)), "_orig_mod")  # the flags last as long as igniter_main
