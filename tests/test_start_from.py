"""Where a run starts: `--resume-from` a step of another run, `--init-from` weights only, and the
run's own latest checkpoint winning over both once it exists, so a restart never loses progress."""

import json
import re
from pathlib import Path

import pytest
import torch

from igniter_dist.tracking.console import format_value
from launch import ROOT, check, python, torchrun

PROBE = ROOT / "tests" / "workers" / "resume_probe.py"
STEP_6, STEP_12 = "step_0000000006", "step_0000000012"
WALL = r"(?:[0-9.]+ s|[0-9]+ min [0-9]{2} s)"  # the wall time in the closing summary


def args(tmp: Path, run: str, *extra: str) -> list[str]:
    return ["--report-dir", str(tmp / run / "r"), "--checkpoint-dir", str(tmp / run / "ckpt"),
            "--output-dir", str(tmp / run / "out"), *extra]


def reports(folder: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{kind}_rank*.json"))]


def final(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Run A: 2 ranks, 2 epochs of 6 steps, checkpoints at steps 6 and 12, model.pt and model.safetensors."""
    tmp = tmp_path_factory.mktemp("start")
    check(torchrun(PROBE, args(tmp, "a", "--max-epochs", "2", "--model-safetensors", "true")))
    (a,) = {(r["digest"], r["model_digest"]) for r in final(tmp / "a" / "r")}  # the same on both ranks
    return tmp, {"digest": a[0], "model_digest": a[1]}


def test_resume_from_another_runs_step_continues_there_exactly(source):
    tmp, a = source
    step6 = tmp / "a" / "ckpt" / STEP_6
    b = check(torchrun(PROBE, args(tmp, "b", "--max-epochs", "2", "--resume-from", str(step6),
                                   "--learning-rate", "0.05", "--keep-best", "eval/loss:min")))
    assert f"igniter-dist: resumed from {step6} (step 6, after epoch 1)\n" in b.stderr
    assert [r["step"] for r in reports(tmp / "b" / "r", "start")] == [6, 6]
    ends = final(tmp / "b" / "r")
    assert {r["digest"] for r in ends} == {a["digest"]}  # as if never stopped
    # The closing summary, from rank 0 alone.
    metrics = ends[0]["metrics"]
    loss = format_value(metrics["eval/loss"])
    evaluation = " ".join(f"{k} {format_value(metrics[k])}" for k in ("eval/loss", "eval/index", "eval/count"))
    assert re.search(re.escape("igniter-dist: finished in ") + WALL + re.escape(
        " at step 12, 6 in this run, epoch 2/2\n"
        f"  last evaluation: {evaluation}\n"
        f"  best eval/loss: {loss} at step 12\n"
        f"  model: {tmp / 'b' / 'out' / 'model' / 'model.pt'}\n"
        f"  latest checkpoint: {tmp / 'b' / 'ckpt' / STEP_12}\n"), b.stderr), b.stderr[-3000:]
    assert b.stderr.count("igniter-dist: finished in") == 1
    assert (tmp / "b" / "ckpt" / STEP_12 / "manifest.json").exists()  # saves go to its own folder
    # The flags that differ from the step's, once, from rank 0, with what wins.
    assert (
        f"igniter-dist: flags that differ from the ones {step6} was saved with:\n"
        "  --learning-rate 0.05 (saved: 0.01): the optimizer restored from the checkpoint keeps its saved "
        f"learning rate; to train with new hyperparameters from these weights, start a fresh run with "
        f"--init-from {step6}\n"
        "  --keep-best eval/loss:min (saved: none): eval/loss:min applies from here on\n"
        "  --model-safetensors false (saved: true): false applies from here on\n"
        f"  --report-dir {tmp / 'b' / 'r'} (saved: {tmp / 'a' / 'r'}): {tmp / 'b' / 'r'} applies from here on\n"
    ) in b.stderr
    assert b.stderr.count("flags that differ") == 1

    # Restarted with --max-epochs raised: its own latest (step 12) wins over --resume-from.
    again = check(torchrun(PROBE, args(tmp, "b", "--max-epochs", "3", "--resume-from", str(step6),
                                       "--learning-rate", "0.05")))
    assert (f"igniter-dist: --resume-from {step6} is ignored: {tmp / 'b' / 'ckpt'} holds this run's own "
            "checkpoints, and its latest wins so that a restart never loses progress.\n") in again.stderr
    assert f"resumed from {tmp / 'b' / 'ckpt' / STEP_12} (step 12, after epoch 2)\n" in again.stderr
    assert (f"igniter-dist: flags that differ from the ones {tmp / 'b' / 'ckpt' / STEP_12} was saved with:\n"
            "  --max-epochs 3 (saved: 2): the run trains on to epoch 3\n") in again.stderr
    assert (tmp / "b" / "ckpt" / "step_0000000018" / "manifest.json").exists()


def test_init_from_a_step_folder_loads_the_weights_alone_and_a_restart_keeps_its_own_progress(source):
    tmp, a = source
    step12 = tmp / "a" / "ckpt" / STEP_12
    command = args(tmp, "c", "--max-epochs", "1", "--init-from", str(step12), "--learning-rate", "0.05",
                   "--interrupt-at", "3")
    first = torchrun(PROBE, command)
    assert first.returncode != 0 and first.stderr.count("exiting with 143") == 2
    assert f"igniter-dist: loaded the weights of 'model' from {step12}; training starts at step 0 with a " \
           "fresh optimizer.\n" in first.stderr
    starts = reports(tmp / "c" / "r", "start")
    assert [(r["model_digest"], r["step"], r["lr"], r["optimizer_state"]) for r in starts] == \
        [(a["model_digest"], 0, 0.05, 0)] * 2  # A's final weights, bitwise; a fresh optimizer at the new rate
    for p in (tmp / "c" / "r").glob("start_rank*.json"):
        p.unlink()
    (saved,) = [int(p.parent.name[5:]) for p in (tmp / "c" / "ckpt").glob("step_*/manifest.json")]
    assert 3 <= saved <= 5  # the agreement lags the signal by one or two steps
    url = f"{tmp / 'c' / 'ckpt'}/step_{saved:010d}"
    assert f"igniter-dist: saved step {saved} to {url} in " in first.stderr
    assert re.search(re.escape("igniter-dist: stopped in ") + WALL + re.escape(
        f" at step {saved}, epoch 1/1\n  latest checkpoint: {url}\n"), first.stderr), first.stderr[-3000:]

    again = check(torchrun(PROBE, command))  # the same command again, as a scheduler would rerun it
    assert f"igniter-dist: --init-from {step12} is ignored" in again.stderr
    assert (f"resumed from {tmp / 'c' / 'ckpt'}/step_{saved:010d} (step {saved}, epoch 1, iteration {saved})\n"
            in again.stderr)
    assert [r["step"] for r in reports(tmp / "c" / "r", "start")] == [saved, saved]


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_init_from_a_model_file_gives_the_same_start(source, name):
    tmp, a = source
    run = name.replace(".", "_")
    check(torchrun(PROBE, args(tmp, run, "--init-from", str(tmp / "a" / "out" / "model" / name), "--max-epochs",
                               "1", "--epoch-length", "1", "--checkpoint-dir", "none", "--learning-rate", "0.05")))
    assert [(r["model_digest"], r["step"], r["lr"], r["optimizer_state"]) for r in reports(tmp / run / "r", "start")] \
        == [(a["model_digest"], 0, 0.05, 0)] * 2  # on both ranks: A's final weights, a fresh optimizer


def test_bad_starting_points_are_one_sentence_and_harm_nothing(source):
    tmp, _ = source
    before = listing(tmp / "a")
    wrong = tmp / "wrong.pt"
    torch.save({"weight": torch.zeros(2, 2)}, wrong)
    cases = [
        (["--resume-from", str(tmp / "nowhere" / STEP_6)], 3,
         f"--resume-from {tmp / 'nowhere' / STEP_6} does not exist."),
        (["--resume-from", str(tmp / "a" / "ckpt")], 3,
         f"--resume-from {tmp / 'a' / 'ckpt'} is not a checkpoint step folder; pass one such as "
         "<checkpoint-dir>/step_0000000270."),
        (["--init-from", str(wrong)], 3,
         f"--init-from {wrong} does not match the model 'model': missing from the file: '0.bias', '0.weight', "
         "'3.bias', '3.weight'; in the file but not in the model: 'weight'."),
        (["--init-from", str(tmp / "a" / "ckpt" / STEP_6), "--resume-from", str(tmp / "a" / "ckpt" / STEP_6)], 2,
         f"--resume-from {tmp / 'a' / 'ckpt' / STEP_6} and --init-from {tmp / 'a' / 'ckpt' / STEP_6} both "
         "choose where the run starts; pass one of them."),
    ]
    for i, (flags, code, sentence) in enumerate(cases):
        result = python(PROBE, args(tmp, f"bad{i}", *flags))
        assert result.returncode == code, result.stderr[-3000:]
        assert result.stderr.endswith(f"error: {sentence}\n"), result.stderr[-3000:]
        assert not list((tmp / f"bad{i}" / "ckpt").glob("step_*"))
    (tmp / "a" / "ckpt" / STEP_6 / "manifest.json").rename(tmp / "manifest.json")
    try:
        result = python(PROBE, args(tmp, "bad9", "--resume-from", str(tmp / "a" / "ckpt" / STEP_6)))
    finally:
        (tmp / "manifest.json").rename(tmp / "a" / "ckpt" / STEP_6 / "manifest.json")
    assert result.returncode == 3 and result.stderr.endswith(
        f"error: --resume-from {tmp / 'a' / 'ckpt' / STEP_6} is not a committed checkpoint: it has no manifest.json "
        "(an interrupted save, or not a checkpoint).\n"), result.stderr[-3000:]
    assert listing(tmp / "a") == before
