"""The checkpoint package's checks as a real 2-rank training run meets them: folders that cannot be
written stop it before the first step, a --keep-best metric that evaluation never logs stops it
after the first evaluation; both on every rank, with one sentence and no checkpoint harmed."""

from __future__ import annotations

from pathlib import Path

from test_checkpoint_damaged import PROBE, committed, probe_args

import launch


def test_an_unwritable_model_dir_stops_every_rank_before_the_first_step(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    ckpt = tmp_path / "ckpt"
    result = launch.torchrun(PROBE, probe_args(tmp_path, "r", str(ckpt), "--model-dir", str(a_file / "model")))
    assert result.returncode != 0
    sentence = (f"error: --model-dir {a_file / 'model'} cannot be written (part of it is a file, not a folder); "
                "pass a folder this process can create and write.")
    assert result.stderr.count(sentence) == 2, result.stderr[-3000:]  # rank 0 probed, both ranks stop
    assert "exitcode  : 2" in result.stderr
    assert committed(str(ckpt)) == [] and not list(Path(tmp_path / "r").glob("rank*.json"))


def test_keep_best_of_a_metric_never_logged_stops_after_the_first_evaluation(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    args = probe_args(tmp_path, "r", ckpt, "--keep-best", "eval/acc:max", "--n-saved", "1", "--save-every", "4steps")
    result = launch.torchrun(PROBE, args)
    assert result.returncode != 0
    # The save of step 4 sees training metrics only; evaluation ends epoch 1 (step 6); the save of
    # step 8 is the first to see eval/loss, and the last.
    sentence = (
        "error: --keep-best eval/acc:max names a metric that is not logged (logged: eval/count, eval/index, eval/loss, "
        "train/")
    assert result.stderr.count(sentence) == 2, result.stderr[-3000:]
    assert result.stderr.count("pass one of these (step 8 was saved and no checkpoint was deleted).") == 2
    assert "exitcode  : 2" in result.stderr
    assert committed(ckpt) == [4, 8]  # with --n-saved 1, retention would have deleted step 4
