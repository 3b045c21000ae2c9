"""Buffers that differ between ranks (BatchNorm statistics) are rank 0's in checkpoints and evaluation (issue 15)."""

import json
import pickle
import sys

import pytest
import torch

from igniter_dist.checkpoint.export import consolidate
from igniter_dist.checkpoint.layout import step_dirname
from launch import ROOT, check, torchrun

PROBE = ROOT / "tests" / "workers" / "buffers_probe.py"
sys.path.insert(0, str(ROOT / "tests" / "workers"))
import buffers_probe  # noqa: E402  # the model and data of the worker, rebuilt here in one process

STEPS = 8  # 2 epochs of 4 steps per rank


def reports(folder):
    return {rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one stopped by SIGTERM in epoch 2 and resumed."""
    tmp = tmp_path_factory.mktemp("buffers")

    def run(name, ckpt, *extra):
        return torchrun(PROBE, ["--report-dir", str(tmp / name), "--checkpoint-dir", str(tmp / ckpt),
                                "--output-dir", str(tmp / f"out_{name}"), *extra])

    reference = check(run("reference", "c1"))
    first = run("first", "c2", "--interrupt-at", "5")
    assert first.returncode != 0 and "exiting with 143" in first.stderr, first.stderr[-3000:]
    check(run("resumed", "c2"))
    return {"tmp": tmp, "reference": reports(tmp / "reference"), "resumed": reports(tmp / "resumed"),
            "stderr": reference.stderr}


def test_the_checkpoint_holds_rank_0s_buffers_whichever_rank_writes_them(runs):
    ref = runs["reference"]
    mine, other = ref[0]["after_last_forward"], ref[1]["after_last_forward"]
    assert all(mine[name] != other[name] for name in mine if "running" in name)  # the ranks' copies differed
    step = runs["tmp"] / "c1" / step_dirname(STEPS)
    metadata = pickle.loads((step / ".metadata").read_bytes())  # our own file
    writers = {key: info.relative_path for key, info in metadata.storage_data.items() if "running" in key.fqn}
    assert "__1_0.distcp" in writers.values()  # DCP's byte balancing had rank 1 write some buffers
    saved = consolidate(str(step))
    for name, value in ref[0]["buffers"].items():
        assert saved[name].tolist() == value, name
    assert ref[0]["buffers"] == ref[1]["buffers"]


def test_a_resume_after_sigterm_ends_bitwise_identical(runs):
    for rank in (0, 1):
        assert runs["resumed"][rank]["digest"] == runs["reference"][rank]["digest"]
    evaluated = {k: v for k, v in runs["reference"][0]["metrics"].items() if k.startswith("eval/")}
    assert evaluated and evaluated.items() <= runs["resumed"][0]["metrics"].items()


def exported_model_on(runs, n):
    """The outputs of the exported model.pt on the first `n` evaluation samples, in this one process."""
    net = buffers_probe.model()
    net.load_state_dict(torch.load(runs["tmp"] / "out_reference" / "model" / "model.pt", weights_only=True))
    net.eval()
    x, y = buffers_probe.eval_set()[:n]
    with torch.no_grad():
        return buffers_probe.eval_outputs(net, x, y)


def test_evaluation_measures_the_exported_model(runs):
    out, metrics = exported_model_on(runs, 22), runs["reference"][0]["metrics"]
    assert metrics["eval/loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    assert metrics["eval/accuracy"] == pytest.approx(out["correct"].mean().item(), rel=1e-6)


def test_an_evaluator_without_samples_is_skipped_with_one_warning(runs):
    warning = ("igniter-dist: warning: the empty loader gave no samples on any rank, so its evaluation is skipped; "
               "give it data or leave it out of eval_spec")
    assert runs["stderr"].count(warning) == 1  # two evaluations, one warning
    metrics = runs["reference"][0]["metrics"]
    assert not [k for k in metrics if k.startswith("empty/")]
    # One sample: rank 1 evaluates none, which is normal; the metric is rank 0's sample alone.
    assert metrics["one/loss"] == pytest.approx(exported_model_on(runs, 1)["loss"].item(), rel=1e-6)
