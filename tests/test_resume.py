"""Never lose work: interrupted runs resume to a bitwise-identical end, with every sample read once."""

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import committed_steps, final_reports

from launch import ROOT, check, child_env, python, torchrun, torchrun_cmd

PROBE = ROOT / "tests" / "workers" / "resume_probe.py"


def probe_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--report-dir", str(tmp / name), "--checkpoint-dir", str(tmp / "ckpt"), "--output-dir",
            str(tmp / "out"), *extra]


# 48 samples, batch 4 per rank, 2 ranks: 6 steps per epoch, 3 epochs, evaluation after each epoch.
@pytest.mark.parametrize("where,step", [("train", 8), ("train", 12), ("eval", 6)],
                         ids=["mid-epoch", "epoch-boundary", "during-evaluation"])
def test_sigterm_then_resume_ends_bitwise_identical(tmp_path, reference, where, step):
    first = torchrun(PROBE, probe_args(tmp_path, "first", "--interrupt-at", str(step), "--interrupt-where", where))
    assert first.returncode != 0
    assert first.stderr.count("stopped by SIGTERM; exiting with 143") == 2, first.stderr[-3000:]
    assert not list((tmp_path / "first").glob("rank*.json"))  # it did stop before the end
    saved = committed_steps(tmp_path / "ckpt")[-1]
    assert step <= saved <= step + 2  # the agreement lags the signal by one or two steps
    second = check(torchrun(PROBE, probe_args(tmp_path, "second")))
    assert f"resumed from {tmp_path / 'ckpt'}/step_{saved:010d}" in second.stderr
    assert [r["digest"] for r in final_reports(tmp_path / "second")] == [reference, reference]


def test_sigint_exits_130_after_saving_single_process(tmp_path):
    result = python(PROBE, probe_args(tmp_path, "a", "--interrupt-at", "5", "--interrupt-signal", "INT"))
    assert result.returncode == 130, result.stderr[-2000:]
    assert committed_steps(tmp_path / "ckpt") == [5]


def test_sigterm_exits_143_single_process(tmp_path):
    result = python(PROBE, probe_args(tmp_path, "a", "--interrupt-at", "3"))
    assert result.returncode == 143, result.stderr[-2000:]
    assert committed_steps(tmp_path / "ckpt") == [3]


def test_sigkill_of_a_worker_under_max_restarts_resumes_from_the_last_checkpoint(tmp_path, reference):
    cmd = torchrun_cmd(PROBE, probe_args(tmp_path, "r", "--interrupt-at", "10", "--interrupt-signal", "KILL",
                                         "--interrupt-rank", "1"), nproc=2, extra=["--max-restarts=1"])
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "step_0000000006" in result.stderr  # epoch 1's checkpoint
    reports = final_reports(tmp_path / "r")
    assert {r["digest"] for r in reports} == {reference}


def test_resume_on_one_rank_reads_each_remaining_sample_once(tmp_path):
    args = ["--max-epochs", "1", "--count-reads", "true"]
    first = torchrun(PROBE, probe_args(tmp_path, "first", *args, "--interrupt-at", "2"))
    assert first.returncode != 0
    saved = committed_steps(tmp_path / "ckpt")[-1]
    consumed = set()
    for p in (tmp_path / "first").glob("reads_rank*.txt"):
        consumed |= {int(x) for x in p.read_text().split()}
    assert len(consumed) == saved * 2 * 4  # what the two ranks trained on before the save
    second = check(python(PROBE, probe_args(tmp_path, "second", *args)))
    assert "resharded from 2 to 1 ranks" in second.stderr
    (report,) = final_reports(tmp_path / "second")
    seen = report["seen"]
    assert sorted(seen) == sorted(set(range(48)) - consumed)  # each remaining sample exactly once
    reads = [int(x) for x in (tmp_path / "second" / "reads_rank0.txt").read_text().split()]
    assert sorted(reads) == sorted(seen)  # nothing already trained on was read again


def test_resumed_run_does_not_reread_batches(tmp_path):
    args = ["--max-epochs", "1", "--count-reads", "true"]
    torchrun(PROBE, probe_args(tmp_path, "first", *args, "--interrupt-at", "3"))
    check(torchrun(PROBE, probe_args(tmp_path, "second", *args)))
    reads = []
    for p in (tmp_path / "second").glob("reads_rank*.txt"):
        reads += [int(x) for x in p.read_text().split()]
    saved = committed_steps(tmp_path / "ckpt")
    first_save = saved[0]
    assert len(reads) == 48 - first_save * 2 * 4 and len(set(reads)) == len(reads)


def test_sigkill_at_random_moments_of_saving_never_breaks_resume(tmp_path, reference):
    """10 trials: kill every process of a job that saves every step, at a random moment; resume must
    start from a committed checkpoint and end bitwise identical to the uninterrupted run."""
    rng = random.Random(1234)
    for trial in range(10):
        folder = tmp_path / f"t{trial}"
        args = probe_args(folder, "first", "--save-every", "1steps", "--n-saved", "2")
        p = subprocess.Popen(torchrun_cmd(PROBE, args), env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not committed_steps(folder / "ckpt") and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        second = check(torchrun(PROBE, probe_args(folder, "second", "--save-every", "1steps", "--n-saved", "2")))
        assert "resumed from" in second.stderr or not committed_steps(folder / "ckpt")
        assert {r["digest"] for r in final_reports(folder / "second")} == {reference}, f"trial {trial}"


def test_time_based_saves_happen_mid_epoch(tmp_path):
    check(python(PROBE, probe_args(tmp_path, "a", "--save-every", "0", "--save-every-minutes", "0.0001",
                                   "--max-epochs", "1", "--n-saved", "50")))
    steps = committed_steps(tmp_path / "ckpt")
    assert len(steps) >= 3 and any(s % 12 for s in steps)  # saves between epoch ends, not only at the end


def test_emergency_save_reports_its_duration(tmp_path):
    result = python(PROBE, probe_args(tmp_path, "a", "--interrupt-at", "4"))
    assert result.returncode == 143
    saved = re.escape(f"saved step 4 to {tmp_path / 'ckpt' / 'step_0000000004'} in ")
    assert re.search(saved + r"[0-9.]+ s after SIGTERM\n", result.stderr), result.stderr[-2000:]


def test_default_agreement_interval_still_stops_mid_epoch_and_resumes_bitwise(tmp_path):
    """With the default --stop-check-every 10 a signal is honoured within 20 steps (sooner at the start,
    where every step checks until rank 0 has timed a step)."""
    args = ["--stop-check-every", "10", "--n-train", "320", "--max-epochs", "1"]  # 40 steps
    check(torchrun(PROBE, probe_args(tmp_path, "ref", *args, "--checkpoint-dir", str(tmp_path / "c0"))))
    first = torchrun(PROBE, probe_args(tmp_path, "first", *args, "--interrupt-at", "3"))
    assert first.returncode != 0 and first.stderr.count("exiting with 143") == 2
    saved = committed_steps(tmp_path / "ckpt")
    assert len(saved) == 1 and 3 <= saved[0] <= 3 + 2 * 10, saved
    check(torchrun(PROBE, probe_args(tmp_path, "second", *args)))
    ref = {r["digest"] for r in final_reports(tmp_path / "ref")}
    assert {r["digest"] for r in final_reports(tmp_path / "second")} == ref and len(ref) == 1


FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"


def test_a_checkpoint_written_before_the_engine_refactor_resumes_bitwise(tmp_path, reference):
    """tests/fixtures/checkpoints/v0-map: the resume probe's step 9 (mid-epoch 2, 2 ranks), as main wrote it on
    2026-12-08 (commit d18f214): it must keep loading, and resume to the uninterrupted run's end."""
    shutil.copytree(FIXTURES / "v0-map", tmp_path / "ckpt")
    second = check(torchrun(PROBE, probe_args(tmp_path, "second")))
    assert f"resumed from {tmp_path / 'ckpt'}/step_0000000009 (step 9, epoch 2, iteration 3)" in second.stderr
    assert {r["digest"] for r in final_reports(tmp_path / "second")} == {reference}
