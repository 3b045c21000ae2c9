"""The headline promise, stopped the way launchers stop jobs: DataLoader workers running, the signal sent from
outside (to torchrun, to every process, to the foreground group, to SageMaker's entrypoint), and every step of
the promise asserted: the step saved after the signal, the relaunch resumed from it, the end bitwise equal.

Each job runs tests/workers/resume_probe.py with 2 loader workers per rank: 48 samples, 4 per rank and step,
2 ranks, so 6 steps an epoch, 3 epochs. Every rank holds step WAIT until the signal reaches it (its marker tells
the test when), and the ranks agree on the stop one step later (--stop-check-every 1 in the probe).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import committed_steps, final_reports, sagemaker_layout, still_running, stop_like_a_launcher

from launch import PYTHON, ROOT, check, free_port, python, run, torchrun, torchrun_cmd

PROBE = ROOT / "tests" / "workers" / "resume_probe.py"
STREAM_PROBE = ROOT / "tests" / "workers" / "stream_probe.py"
WAIT = 7  # mid-epoch 2
EXIT = {"SIGTERM": 143, "SIGINT": 130}


def probe_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--report-dir", str(tmp / name), "--checkpoint-dir", str(tmp / "ckpt"), "--output-dir",
            str(tmp / "out"), "--workers", "2", *extra]


def markers(report_dir: Path, ranks: int = 2) -> list[Path]:
    return [report_dir / f"waiting_rank{r}" for r in range(ranks)]


def expected_save(accumulate: int, ranks: int = 2) -> int:
    """The step the stop is saved at: agreed one step after WAIT (with several ranks), at a window's end."""
    agreed = WAIT + 1 if ranks > 1 else WAIT
    return -(-agreed // accumulate) * accumulate


def assert_saved_and_stopped(stopped, tmp: Path, signame: str, step: int, ranks: int = 2) -> None:
    """The job saved `step` after the signal, every rank exited 128 + N, and no process of it is left."""
    assert f"{signame} received; saving at the next step boundary" in stopped.stderr, stopped.stderr[-3000:]
    saved = re.escape(f"saved step {step} to {tmp / 'ckpt' / f'step_{step:010d}'} in ")
    assert re.search(saved + rf"[0-9.]+ s after {signame}\n", stopped.stderr), stopped.stderr[-3000:]
    assert stopped.stderr.count(f"stopped by {signame}; exiting with {EXIT[signame]}") == ranks, stopped.stderr[-3000:]
    assert "DataLoader worker" not in stopped.stderr  # no worker died of the signal
    assert committed_steps(tmp / "ckpt")[-1] == step
    workers = [c for rank in stopped.tree for c in stopped.tree[rank] if not stopped.tree.get(c)]
    assert len(workers) >= 2 * ranks, stopped.tree  # each rank had its loader workers when the signal came
    assert still_running(list(stopped.tree)) == []  # ranks and workers are all gone


def resume_and_compare(tmp: Path, step: int, reference: str, *extra: str, ranks: int = 2) -> None:
    """The same command again resumes from `step` and ends with the uninterrupted run's digest."""
    args = probe_args(tmp, "second", *extra)
    second = check(torchrun(PROBE, args) if ranks > 1 else python(PROBE, args))
    assert f"resumed from {tmp / 'ckpt'}/step_{step:010d}" in second.stderr, second.stderr[-3000:]
    assert {r["digest"] for r in final_reports(tmp / "second")} == {reference}


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """Uninterrupted 2-rank runs with --accumulate-grad-batches 3, under ddp and under fsdp."""
    digests = {}
    for strategy in ("ddp", "fsdp"):
        tmp = tmp_path_factory.mktemp(f"accumulate-{strategy}")
        check(torchrun(PROBE, probe_args(tmp, "r", "--accumulate-grad-batches", "3", "--strategy", strategy)))
        (digest,) = {r["digest"] for r in final_reports(tmp / "r")}
        digests[strategy] = digest
    return digests


def test_sigterm_to_torchrun_saves_the_agreed_step_with_workers_running_and_resumes_bitwise(tmp_path, reference):
    stopped = stop_like_a_launcher(torchrun_cmd(PROBE, probe_args(tmp_path, "first", "--wait-for-stop-at", str(WAIT))),
                                   "sigterm-to-torchrun", markers(tmp_path / "first"))
    assert_saved_and_stopped(stopped, tmp_path, "SIGTERM", expected_save(1))
    resume_and_compare(tmp_path, expected_save(1), reference)


def test_sigterm_to_every_process_inside_an_accumulation_window_saves_the_windows_end(tmp_path, accumulated):
    """Every process gets SIGTERM, and torchrun forwards its own copy: the repeat is the same stop, not an abort.
    The stop is agreed at step 8, inside the window 7-9, so step 9 is saved (ddp)."""
    args = probe_args(tmp_path, "first", "--wait-for-stop-at", str(WAIT), "--accumulate-grad-batches", "3")
    stopped = stop_like_a_launcher(torchrun_cmd(PROBE, args), "sigterm-to-every-process", markers(tmp_path / "first"))
    assert "aborting" not in stopped.stderr
    assert_saved_and_stopped(stopped, tmp_path, "SIGTERM", expected_save(3))
    assert expected_save(3) == 9
    resume_and_compare(tmp_path, 9, accumulated["ddp"], "--accumulate-grad-batches", "3")


def test_ctrl_c_to_the_foreground_group_under_fsdp_inside_a_window_saves_the_windows_end(tmp_path, accumulated):
    args = probe_args(tmp_path, "first", "--wait-for-stop-at", str(WAIT), "--accumulate-grad-batches", "3",
                      "--strategy", "fsdp")
    stopped = stop_like_a_launcher(torchrun_cmd(PROBE, args), "sigint-to-foreground-group", markers(tmp_path / "first"))
    assert_saved_and_stopped(stopped, tmp_path, "SIGINT", 9)
    resume_and_compare(tmp_path, 9, accumulated["fsdp"], "--accumulate-grad-batches", "3", "--strategy", "fsdp")


def test_ctrl_c_to_a_single_process_and_its_workers_saves_and_resumes_bitwise(tmp_path):
    """`python train.py` in a terminal: Ctrl-C reaches the process and its loader workers, one group."""
    ref = tmp_path / "ref"
    check(python(PROBE, probe_args(ref, "r")))
    (reference,) = {r["digest"] for r in final_reports(ref / "r")}
    stopped = stop_like_a_launcher([PYTHON, str(PROBE), *probe_args(tmp_path, "first", "--wait-for-stop-at",
                                                                    str(WAIT))],
                                   "sigint-to-foreground-group", markers(tmp_path / "first", ranks=1))
    assert_saved_and_stopped(stopped, tmp_path, "SIGINT", expected_save(1, ranks=1), ranks=1)
    resume_and_compare(tmp_path, WAIT, reference, ranks=1)


def test_sagemaker_stop_sigterm_to_the_entrypoint_saves_and_the_restarted_job_resumes(tmp_path, reference):
    """SageMaker stops a job (and a spot interruption ends one) with SIGTERM to the container's PID 1, our
    entrypoint (exec'd into torchrun); the restarted job runs the same entrypoint over the same checkpoints."""
    base = sagemaker_layout(tmp_path / "ml", "algo-1", ["algo-1"])
    env = {"SAGEMAKER_BASE_DIR": str(base), "SM_MASTER_PORT": str(free_port()), "TRAINING_JOB_NAME": "spot",
           "SAGEMAKER_HOST_ADDRESSES": "algo-1=127.0.0.1"}

    def entrypoint(name: str, *extra: str) -> list[str]:
        return [PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", "--nproc-per-node", "2", str(PROBE),
                "--report-dir", str(tmp_path / name), "--workers", "2", *extra]

    stopped = stop_like_a_launcher(entrypoint("first", "--wait-for-stop-at", str(WAIT)), "sigterm-to-torchrun",
                                   markers(tmp_path / "first"), env=env)
    step = expected_save(1)
    ckpt = base / "checkpoints"  # SageMaker's default --checkpoint-dir, synced with the job's S3 URI
    assert re.search(re.escape(f"saved step {step} to {ckpt / f'step_{step:010d}'} in ") + r"[0-9.]+ s after SIGTERM",
                     stopped.stderr), stopped.stderr[-3000:]
    assert stopped.stderr.count("stopped by SIGTERM; exiting with 143") == 2
    assert committed_steps(ckpt)[-1] == step
    assert still_running(list(stopped.tree)) == []
    second = check(run(entrypoint("second"), env=env))
    assert f"resumed from {ckpt}/step_{step:010d}" in second.stderr, second.stderr[-3000:]
    assert {r["digest"] for r in final_reports(tmp_path / "second")} == {reference}


def test_a_stateful_dataloader_with_two_workers_survives_sigterm_to_torchrun_and_resumes_exactly(tmp_path):
    """torchdata's StatefulDataLoader is not rebuilt by igniter-dist: its workers are protected in place."""
    args = ["--max-steps", "12", "--save-every", "4steps", "--loader", "stateful", "--workers", "2",
            "--count-reads", "true", "--checkpoint-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out")]
    check(torchrun(STREAM_PROBE, ["--report-dir", str(tmp_path / "r"), *args, "--checkpoint-dir",
                                  str(tmp_path / "ref-ckpt")]))
    reference = [(tmp_path / "r" / f"rank{r}.json").read_text() for r in range(2)]
    stopped = stop_like_a_launcher(
        torchrun_cmd(STREAM_PROBE, ["--report-dir", str(tmp_path / "first"), *args, "--wait-for-stop-at", str(WAIT)]),
        "sigterm-to-torchrun", markers(tmp_path / "first"))
    assert_saved_and_stopped(stopped, tmp_path, "SIGTERM", expected_save(1))
    second = check(torchrun(STREAM_PROBE, ["--report-dir", str(tmp_path / "second"), *args]))
    assert f"resumed from {tmp_path / 'ckpt'}/step_{expected_save(1):010d}" in second.stderr
    for rank in range(2):
        ref, got = json.loads(reference[rank]), json.loads((tmp_path / "second" / f"rank{rank}.json").read_text())
        assert got["digest"] == ref["digest"]
        assert got["seen"] == ref["seen"][expected_save(1) * 4:]  # what was left, once
        # The workers prefetch past the last step, but never read again what was trained on before the save.
        read = {int(x) for p in (tmp_path / "second").glob(f"reads_rank{rank}_*.txt") for x in p.read_text().split()}
        assert not read & set(ref["seen"][:expected_save(1) * 4])
