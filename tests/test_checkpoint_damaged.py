"""Damaged committed checkpoints: reported, kept byte for byte, passed over for the newest intact one,
never counted or deleted by retention, marked by the CLI; real 2-rank resumes on a local folder and
on moto's S3 end bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
from fixtures_s3 import clear_s3fs_cache
from test_checkpoint_safety import objects, put, save

import launch
from igniter_dist.checkpoint import CheckpointManager
from igniter_dist.checkpoint.layout import DCP_METADATA, MANIFEST, step_dirname
from igniter_dist.checkpoint.storage import Storage
from igniter_dist.cli import main as cli_main
from igniter_dist.errors import CheckpointError, DamagedCheckpoint
from igniter_dist.runtime import Runtime

PROBE = launch.ROOT / "tests" / "workers" / "resume_probe.py"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3_bucket") + "/run"


def read(url: str, rel: str) -> bytes:
    return Storage(url).read_bytes(*rel.split("/"))


def snapshot(url: str, step: int) -> dict[str, bytes]:
    """Every file of a step folder, byte for byte."""
    st = Storage(url)
    return {name: st.read_bytes(step_dirname(step), name) for name in st.find(step_dirname(step))}


def truncate(url: str, step: int, name: str = "__0_0.distcp", keep: int = 100) -> None:
    put(url, f"{step_dirname(step)}/{name}", read(url, f"{step_dirname(step)}/{name}")[:keep])


def corrupt_record(url: str, step: int, fqn_prefix: str) -> str:
    """Overwrite, keeping the file's size, the torch.save record of the first value under `fqn_prefix`
    with zeros: a damage the recorded sizes cannot see. Returns the file it damaged."""
    md = pickle.loads(read(url, f"{step_dirname(step)}/{DCP_METADATA}"))  # our own file: trusted here
    idx, info = next((i, s) for i, s in sorted(md.storage_data.items(), key=lambda e: e[0].fqn)
                     if i.fqn.startswith(fqn_prefix))
    data = read(url, f"{step_dirname(step)}/{info.relative_path}")
    damaged = data[:info.offset] + bytes(info.length) + data[info.offset + info.length:]
    put(url, f"{step_dirname(step)}/{info.relative_path}", damaged)
    return info.relative_path


def model_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a["model"].state_dict().values(), b["model"].state_dict().values(),
                                                   strict=True))


def test_load_latest_passes_over_damaged_steps_and_keeps_them(store, caplog):
    for step in (1, 2, 3):
        assert save(store, step, objects(seed=step), n_saved=5)
    truncate(store, 3)  # the sizes show it
    corrupt_record(store, 2, "model.")  # only reading shows it
    before = {s: snapshot(store, s) for s in (2, 3)}
    state = objects(seed=9)
    with caplog.at_level(logging.WARNING, logger="igniter_dist.checkpoint"):
        result = CheckpointManager(store, Runtime()).load_latest(state)
    assert result is not None and result.step == 1 and model_equal(state, objects(seed=1))
    lines = [r.getMessage() for r in caplog.records if r.name == "igniter_dist.checkpoint"]
    url3, url2 = f"{store}/{step_dirname(3)}", f"{store}/{step_dirname(2)}"
    assert f"The checkpoint {url3} is damaged: __0_0.distcp has 100 bytes where the manifest recorded" in lines[0]
    assert lines[0].endswith("It is left on disk untouched.") and "\n" not in lines[0]
    assert lines[1].startswith(f"The checkpoint {url2} is damaged: reading it failed (")
    assert lines[2] == f"Resuming from {store}/{step_dirname(1)}, the newest intact checkpoint."
    assert {s: snapshot(store, s) for s in (2, 3)} == before

    # Every committed step damaged: a sentence naming them and the way forward, nothing deleted.
    Storage(store).rm(step_dirname(1), "__0_0.distcp")  # deleted by hand
    with pytest.raises(CheckpointError, match=re.escape(
            f"Every committed checkpoint in {store} is damaged (step_0000000001, step_0000000002, "
            "step_0000000003); move those folders out of it (or choose another --checkpoint-dir) to start "
            "afresh, or pass --resume false.")):
        CheckpointManager(store, Runtime()).load_latest(objects())
    assert {s: snapshot(store, s) for s in (2, 3)} == before
    assert any(r.getMessage().startswith(f"The checkpoint {store}/{step_dirname(1)} is damaged: __0_0.distcp is "
                                         "missing.") for r in caplog.records)
    assert CheckpointManager(store + "-empty", Runtime()).load_latest(objects()) is None


def test_a_damaged_step_is_never_counted_deleted_or_overwritten_by_saves(tmp_path, caplog):
    url = str(tmp_path / "ck")
    for step in (1, 5):
        assert save(url, step, objects(seed=step))
    truncate(url, 5)
    damaged = snapshot(url, 5)
    # A resumed run (from step 1) saves step 2 with --n-saved 1: step 5, the newest committed, is
    # damaged, so the intact step 2 is what retention keeps.
    assert save(url, 2, objects(seed=2), n_saved=1)
    committed = sorted(p.parent.name for p in Path(url).glob(f"step_*/{MANIFEST}"))
    assert committed == [step_dirname(2), step_dirname(5)] and snapshot(url, 5) == damaged
    # It reaches step 5: the damaged folder is kept as it is, and the save says so.
    with caplog.at_level(logging.WARNING, logger="igniter_dist.checkpoint"):
        assert save(url, 5, objects(seed=5), n_saved=1)
    assert snapshot(url, 5) == damaged
    assert any(f"{step_dirname(5)} is committed but damaged (__0_0.distcp has 100 bytes" in r.getMessage()
               for r in caplog.records if r.name == "igniter_dist.checkpoint")
    state = objects(seed=9)
    CheckpointManager(url, Runtime()).load(2, state)
    assert model_equal(state, objects(seed=2))
    with pytest.raises(DamagedCheckpoint, match=r"step_0000000005 is damaged: __0_0.distcp has 100 bytes"):
        CheckpointManager(url, Runtime()).load(5, objects())


def test_cli_marks_damaged_steps_and_a_missing_root_is_an_error(store, capsys):
    for step in (1, 2):
        assert save(store, step, objects(seed=step))
    truncate(store, 2)
    capsys.readouterr()
    assert cli_main(["checkpoints", "list", store, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["latest"], r["damaged"]) for r in rows] == [
        (1, False, None), (2, True, rows[1]["damaged"])]
    assert rows[1]["damaged"].startswith("__0_0.distcp has 100 bytes where the manifest recorded")
    assert cli_main(["checkpoints", "list", store]) == 0
    table = capsys.readouterr().out.splitlines()
    assert re.match(r"\s+2\s+damaged\s", table[2]) and "__0_0.distcp has 100 bytes" in table[3], table
    assert cli_main(["checkpoints", "verify", store]) == 1
    out = capsys.readouterr()
    assert f"OK {store}/{step_dirname(1)}" in out.out
    assert f"FAIL {store}/{step_dirname(2)}: __0_0.distcp has 100 bytes" in out.out
    assert "1 of 2 checkpoint(s) damaged." in out.err
    assert cli_main(["checkpoints", "verify", f"{store}/{step_dirname(1)}"]) == 0

    missing = store + "-missing"
    clear_s3fs_cache()
    assert cli_main(["checkpoints", "list", missing]) == 3
    assert capsys.readouterr().err == (f"igniter-dist: error: {missing} does not exist; pass the --checkpoint-dir "
                                       "of a run (a folder or URL).\n")


# ---- real 2-rank runs of the engine (tests/workers/resume_probe.py) ----------------------------
# 48 samples, batch 4 per rank, 2 ranks: 6 steps per epoch, 3 epochs, a checkpoint after each epoch.


def probe_args(tmp: Path, name: str, checkpoint_dir: str, *extra: str) -> list[str]:
    return ["--report-dir", str(tmp / name), "--checkpoint-dir", checkpoint_dir, "--output-dir", str(tmp / "out"),
            *extra]


def digests(folder: Path) -> list[str]:
    return [json.loads(p.read_text())["digest"] for p in sorted(folder.glob("rank*.json"))]


def committed(url: str) -> list[int]:
    clear_s3fs_cache()
    listing = Storage(url).find()
    return sorted(int(rel.split("/")[0].split("_")[1]) for rel in listing if rel.endswith(f"/{MANIFEST}"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The final state digest of an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("reference")
    launch.check(launch.torchrun(PROBE, probe_args(tmp, "r", str(tmp / "ckpt"))))
    (digest, *others) = digests(tmp / "r")
    assert others == [digest]
    return digest


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_latest_checkpoint_is_passed_over_and_the_run_ends_bitwise_identical(where, tmp_path, reference,
                                                                                      request):
    url = str(tmp_path / "ckpt") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    first = launch.torchrun(PROBE, probe_args(tmp_path, "first", url, "--interrupt-at", "8"))
    assert first.returncode != 0 and first.stderr.count("exiting with 143") == 2, first.stderr[-3000:]
    previous, damaged = committed(url)  # the first epoch's checkpoint and the one saved on SIGTERM
    assert previous == 6 and 8 <= damaged <= 10
    truncate(url, damaged)
    before = snapshot(url, damaged)

    second = launch.check(launch.torchrun(PROBE, probe_args(tmp_path, "second", url)))
    assert second.stderr.count(f"The checkpoint {url}/{step_dirname(damaged)} is damaged: __0_0.distcp has 100 bytes "
                               "where the manifest recorded") == 1, second.stderr[-3000:]
    assert f"Resuming from {url}/{step_dirname(6)}, the newest intact checkpoint." in second.stderr
    assert f"resumed from {url}/{step_dirname(6)} (step 6," in second.stderr
    assert digests(tmp_path / "second") == [reference, reference]
    assert snapshot(url, damaged) == before
    # Retention kept the two newest intact checkpoints and never touched the damaged one.
    assert committed(url) == [damaged, 12, 18]
    if where == "s3":
        return

    # Now every committed step is damaged, one of them in a way only rank 1 finds (its own per-rank
    # state, the right size): both ranks agree and stop with one sentence, deleting nothing.
    truncate(url, 12)
    corrupt_record(url, 18, "per_rank/1.")
    damaged_files = {s: snapshot(url, s) for s in (damaged, 12, 18)}
    third = launch.torchrun(PROBE, probe_args(tmp_path, "third", url))
    assert third.returncode != 0
    sentence = (f"error: Every committed checkpoint in {url} is damaged ({step_dirname(damaged)}, "
                f"{step_dirname(12)}, {step_dirname(18)}); move those folders out of it (or choose another "
                "--checkpoint-dir) to start afresh, or pass --resume false.")
    assert third.stderr.count(sentence) == 2, third.stderr[-3000:]
    assert "exitcode  : 3" in third.stderr
    assert f"{url}/{step_dirname(18)} is damaged: the value 'per_rank/1.rank' does not load" in third.stderr
    assert {s: snapshot(url, s) for s in (damaged, 12, 18)} == damaged_files
