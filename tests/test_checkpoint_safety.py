"""Checkpoints on one process: crafted files refused, clear errors, retention rules, the CLI."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_s3 import clear_s3fs_cache
from torch import nn

import launch
from igniter_dist.checkpoint import CheckpointManager, export_model
from igniter_dist.checkpoint import state as state_mod
from igniter_dist.checkpoint.layout import MANIFEST, step_dirname
from igniter_dist.checkpoint.probe import check_writable, unwritable
from igniter_dist.checkpoint.retention import KeepBest, choose_kept, parse_keep_best, unlogged_metric
from igniter_dist.checkpoint.storage import Storage
from igniter_dist.cli import main as cli_main
from igniter_dist.errors import CheckpointError, ConfigError
from igniter_dist.runtime import Runtime


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3_bucket") + "/run"


def objects(seed: int = 0, hidden: int = 16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def save(url: str, step: int, state=None, metrics=None, **kwargs) -> bool:
    with CheckpointManager(url, Runtime(), **kwargs) as mgr:  # leaving waits for retention's deletions
        return mgr.save(step, state or objects(), per_rank={"cursor": step}, manifest={"epoch": 1}, metrics=metrics)


def put(url: str, rel: str, data: bytes) -> None:
    st = Storage(url)
    path = st.path_of(*rel.split("/"))
    if st.is_local:
        st.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    st.fs.pipe_file(path, data)
    clear_s3fs_cache()


def reseal(url: str, step: int) -> None:
    """Record the folder's present file sizes in its manifest, as a crafted checkpoint would."""
    st = Storage(url)
    manifest = json.loads(st.read_bytes(step_dirname(step), MANIFEST))
    present = st.find(step_dirname(step))
    manifest["files"] = [{"name": f["name"], "size": present[f["name"]]} for f in manifest["files"]]
    put(url, f"{step_dirname(step)}/{MANIFEST}", json.dumps(manifest).encode())


def test_crafted_metadata_is_refused_and_runs_nothing(store, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsCode(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    save(store, 1)
    put(store, f"{step_dirname(1)}/.metadata", payload)
    reseal(store, 1)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*step_0000000001.*not plain DCP metadata"):
        CheckpointManager(store, Runtime()).load(1, objects(seed=1))
    assert cli_main(["checkpoints", "show", store]) == 3
    assert cli_main(["checkpoints", "verify", store]) == 1
    assert cli_main(["checkpoints", "export", store, "--to", str(tmp_path / "m.pt")]) == 3
    assert not marker.exists()


def test_code_hidden_inside_real_metadata_or_a_value_is_refused(tmp_path, monkeypatch):
    url = str(tmp_path / "ck")
    marker = tmp_path / "pwned"
    save(url, 1)
    st = Storage(url)
    path = st.path_of(step_dirname(1), ".metadata")
    real = pickle.loads(st.fs.cat_file(path))  # our own file: trusted here
    real.planner_data["model.0.weight"] = RunsCode(marker)
    st.fs.pipe_file(path, pickle.dumps(real))
    reseal(url, 1)
    with pytest.raises(CheckpointError, match="not a DCP metadata type"):
        CheckpointManager(url, Runtime()).load(1, objects())
    assert not marker.exists()

    # Saving refuses a value that would not load back; a crafted value slipped in is refused at load.
    url2 = str(tmp_path / "ck2")
    with pytest.raises(ConfigError, match=r"Cannot checkpoint per_rank\['np'\]: a numpy.ndarray"):
        CheckpointManager(url2, Runtime()).save(1, objects(), per_rank={"np": np.zeros(2)}, manifest={})
    state = objects()
    state["extra"] = {"payload": RunsCode(marker)}
    with pytest.raises(ConfigError, match="Cannot checkpoint extra\\['payload'\\]"):
        save(url2, 1, state)
    monkeypatch.setattr(state_mod, "unloadable", lambda sd: None)
    assert save(url2, 1, state)  # as if written by something that does not check
    refused = r"ck2/step_0000000001 is damaged: the value 'extra.payload' does not load with weights_only"
    with pytest.raises(CheckpointError, match=refused):
        CheckpointManager(url2, Runtime()).load(1, {**objects(), "extra": {}})
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    url = str(tmp_path / "ck")
    save(url, 1)
    st = Storage(url)
    path = st.path_of(step_dirname(1), ".metadata")
    md = pickle.loads(st.fs.cat_file(path))
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    st.fs.pipe_file(path, pickle.dumps(md))
    reseal(url, 1)
    with pytest.raises(CheckpointError, match="points at a file outside the checkpoint"):
        CheckpointManager(url, Runtime()).load(1, objects())


def test_errors_name_the_url_and_the_cause(tmp_path):
    url = str(tmp_path / "ck")
    mgr = CheckpointManager(url, Runtime())
    assert mgr.latest() is None
    with pytest.raises(CheckpointError, match=r"No committed checkpoint for step 5 in .*/ck; it has no committed"):
        mgr.load(5, objects())
    save(url, 5)
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"does not match the model 'model': missing from the checkpoint: "
                                              r"'1.bias', '1.weight', '3.bias', '3.weight'; in the checkpoint but not "
                                              r"in the model: '2.bias'"):
        CheckpointManager(url, Runtime()).load(5, {"model": other})
    with pytest.raises(CheckpointError, match="holds no state named 'scheduler'"):
        CheckpointManager(url, Runtime()).load(5, {**objects(), "scheduler": {}})
    with pytest.raises(CheckpointError, match=r"Could not prepare the folder for step 1 at "
                                              r"/dev/null/ck/step_0000000001: NotADirectoryError"):
        save("/dev/null/ck", 1)
    assert save("/dev/null/ck", 1, on_error="warn") is False
    denied = Storage("s3://some-bucket/run").describe(PermissionError("Access Denied"))
    assert "s3:ListBucket" in denied and "s3:PutObject" in denied


def test_settings_are_validated_with_one_sentence():
    with pytest.raises(ConfigError, match=r"--keep-best expects NAME:max or NAME:min .* got 'accuracy'"):
        CheckpointManager("unused", Runtime(), keep_best="accuracy")
    with pytest.raises(ConfigError, match="--n-saved must be a positive integer"):
        CheckpointManager("unused", Runtime(), n_saved=0)
    with pytest.raises(ConfigError, match="--on-checkpoint-error must be stop or warn"):
        CheckpointManager("unused", Runtime(), on_error="ignore")  # type: ignore[arg-type]  # the wrong value is the test
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="trains parameters of no single nn.Module"):
        save("unused", 1, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    assert parse_keep_best("eval/loss:MIN") == KeepBest("eval/loss", "min")
    assert parse_keep_best(None) is None


def test_choose_kept_keeps_newest_and_best():
    m = {1: {"acc": 0.9}, 2: {"acc": 0.1}, 3: {"acc": 0.5}, 4: {}, 5: {"acc": 0.2}}
    assert choose_kept(m, 2, None) == {4, 5}
    assert choose_kept(m, 2, KeepBest("acc", "max")) == {1, 4, 5}
    assert choose_kept(m, 1, KeepBest("acc", "min")) == {2, 5}
    assert choose_kept(m, 1, KeepBest("missing", "max")) == {5}
    assert choose_kept({1: {"acc": 0.5}, 2: {"acc": 0.5}}, 1, KeepBest("acc", "max")) == {2}
    assert choose_kept({}, 2, None) == set()


def test_committed_step_is_never_overwritten_and_leftovers_are_replaced(tmp_path):
    url = str(tmp_path / "ck")
    first = objects(seed=1)
    assert save(url, 3, first)
    manifest = Storage(url).read_bytes(step_dirname(3), MANIFEST)
    assert save(url, 3, objects(seed=2))  # already committed: kept as it is
    assert Storage(url).read_bytes(step_dirname(3), MANIFEST) == manifest
    put(url, f"{step_dirname(4)}/__0_0.distcp", b"half a shard from a dead run")
    assert save(url, 4, objects(seed=3))
    assert sorted(Storage(url).find(step_dirname(4))) == [".metadata", "__0_0.distcp", MANIFEST]
    loaded = objects(seed=9)
    CheckpointManager(url, Runtime()).load(3, loaded)
    want = first["model"].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded["model"].state_dict().items())


def test_keep_best_survives_a_restart(tmp_path):
    url = str(tmp_path / "ck")
    for step, acc in [(1, 0.2), (2, 0.8), (3, 0.3)]:
        assert save(url, step, metrics={"eval/accuracy": acc}, n_saved=1, keep_best="eval/accuracy:max")
    # A new manager (a restarted run) reads the best from the manifests.
    assert save(url, 4, metrics={"eval/accuracy": 0.1}, n_saved=1, keep_best="eval/accuracy:max")
    assert sorted(Storage(url).find()) == sorted(f"{step_dirname(s)}/{f}" for s in (2, 4)
                                                 for f in (".metadata", "__0_0.distcp", MANIFEST))


def test_cli_verify_finds_damage_and_the_console_command_runs(tmp_path, capsys):
    url = str(tmp_path / "ck")
    save(url, 7, metrics={"eval/accuracy": 0.5})
    r = launch.run([launch.PYTHON, "-m", "igniter_dist.cli", "checkpoints", "list", url])
    assert r.returncode == 0 and "latest" in r.stdout and "eval/accuracy=0.5" in r.stdout, r.stderr
    shard = Path(url) / step_dirname(7) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    capsys.readouterr()
    assert cli_main(["checkpoints", "verify", f"{url}/{step_dirname(7)}"]) == 1
    assert "has " in capsys.readouterr().out
    shard.unlink()
    assert cli_main(["checkpoints", "verify", url]) == 1
    assert "__0_0.distcp is missing" in capsys.readouterr().out
    assert cli_main(["checkpoints", "show", f"{url}/step_8"]) == 3


def test_export_model_is_weights_only_loadable(tmp_path):
    model = objects()["model"]
    export_model(model, str(tmp_path / "out" / "model.pt"))
    loaded = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    buf = io.BytesIO((tmp_path / "out" / "model.pt").read_bytes())
    assert torch.load(buf, weights_only=True).keys() == loaded.keys()


def test_export_model_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = objects()["model"]
    export_model(model, str(tmp_path / "out" / "model.safetensors"))
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def committed_steps(url: str) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in Path(url).glob(f"step_*/{MANIFEST}"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keep_best_of_a_metric_never_logged_stops_once_evaluated_keeping_everything(tmp_path, async_save):
    url = str(tmp_path / "ck")
    options = {"n_saved": 1, "keep_best": "eval/acc:max", "async_save": async_save}
    assert save(url, 1, metrics={"train/loss": 0.5}, **options)  # no evaluation yet: it may still come
    with pytest.raises(ConfigError) as raised:
        save(url, 2, metrics={"train/loss": 0.4, "eval/accuracy": 0.9, "eval/loss": 0.3}, **options)
    assert str(raised.value) == (
        "--keep-best eval/acc:max names a metric that is not logged (logged: eval/accuracy, eval/loss, train/loss); "
        "pass one of these (step 2 was saved and no checkpoint was deleted).")
    assert committed_steps(url) == [1, 2]  # --n-saved 1 would have deleted step 1
    assert unlogged_metric(KeepBest("train/acc", "max"), {"train/loss": 1.0}) is not None  # its own group logged
    assert unlogged_metric(KeepBest("eval/acc", "max"), {"train/loss": 1.0}) is None
    assert unlogged_metric(KeepBest("eval/acc", "min"), {"eval/acc": 1.0, "eval/loss": 2.0}) is None


def test_unwritable_local_folders_are_named_before_anything_runs(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert unwritable(str(a_file)) == "it is a file, not a folder"
    assert unwritable(str(a_file / "ck")) == "part of it is a file, not a folder"
    fresh = tmp_path / "new" / "ck"
    assert unwritable(str(fresh)) is None and fresh.is_dir() and not list(fresh.iterdir())  # probe removed
    with pytest.raises(CheckpointError) as raised:
        check_writable(Runtime(), checkpoint_dir=str(a_file / "ck"), output_dir=str(fresh), model_dir=None)
    assert str(raised.value) == (f"--checkpoint-dir {a_file / 'ck'} cannot be written (part of it is a file, not a "
                                 "folder); pass a folder this process can create and write.")
    with pytest.raises(ConfigError, match=rf"^--output-dir {a_file} cannot be written \(it is a file, not a folder\)"):
        check_writable(Runtime(), checkpoint_dir=str(fresh), output_dir=str(a_file), model_dir=None)
    with pytest.raises(ConfigError, match=r"^--model-dir .*/file/model cannot be written \(part of it is a file"):
        check_writable(Runtime(), checkpoint_dir=None, output_dir=None, model_dir=str(a_file / "model"))
    check_writable(Runtime(), checkpoint_dir="memory://run/ck", output_dir=str(fresh), model_dir=str(fresh / "m"))


def test_a_missing_bucket_is_named_before_anything_runs(s3_endpoint):
    with pytest.raises(CheckpointError, match=r"^Could not list checkpoints in s3://no-such-bucket-probe/run: the "
                                              r"bucket 'no-such-bucket-probe' does not exist"):
        check_writable(Runtime(), checkpoint_dir="s3://no-such-bucket-probe/run", output_dir=None, model_dir=None)


def test_a_read_only_folder_is_named_before_anything_runs(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("this user (root) can write a 0o500 folder; a path under a file covers it instead")
        assert unwritable(str(read_only)) == "permission denied"
        assert unwritable(str(read_only / "ck")) == "permission denied"
    finally:
        read_only.chmod(0o700)


def test_sync_saves_skip_the_zip_crc_on_their_own_thread_and_background_writes_keep_it(tmp_path):
    sync_url, async_url = str(tmp_path / "sync"), str(tmp_path / "async")
    assert save(sync_url, 1)
    assert save(async_url, 1, async_save=True)
    assert torch.serialization.get_crc32_options()  # restored after the sync save

    def crcs(url: str) -> set[int]:
        """The CRC32 of every entry of every tensor record in the step's shard."""
        folder = Path(url) / step_dirname(1)
        md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
        data = (folder / "__0_0.distcp").read_bytes()
        return {entry.CRC for info in md.storage_data.values()
                for entry in zipfile.ZipFile(io.BytesIO(data[info.offset:info.offset + info.length])).infolist()
                if info.offset is not None and data[info.offset:info.offset + 2] == b"PK"}

    assert crcs(sync_url) == {0}
    assert 0 not in crcs(async_url)
