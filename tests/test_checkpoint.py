"""Checkpoints across real processes: 2-rank torchrun saves on a local folder and on moto's S3 server,
loads on 1, 2 and 3 ranks, SIGKILL at several points of a save, retention across runs, S3 outages.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_s3 import StoppableS3Server
from torch import nn

import launch
from igniter_dist.checkpoint import CheckpointManager
from igniter_dist.checkpoint.layout import MANIFEST
from igniter_dist.checkpoint.storage import Storage
from igniter_dist.cli import main as cli_main
from igniter_dist.errors import CheckpointError
from igniter_dist.runtime import Runtime

WORKER = Path(__file__).parent / "workers" / "checkpoint_worker.py"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3_bucket") + "/run"


def worker(mode: str, url: str, expect: Path, *args: str, nproc: int = 2, env: dict | None = None):
    return launch.torchrun(WORKER, [mode, "--url", url, "--expect", str(expect), *args], nproc=nproc,
                           env=env, timeout=240)


def fresh_objects():
    """The worker's model, optimizer, scheduler and counters, with other weights, in this process."""
    torch.manual_seed(4321)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    counters = {"seen": torch.zeros(3, dtype=torch.int64), "epoch": 0}
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "counters": counters}


def assert_loads_here(url: str, step: int, expect: Path) -> None:
    """Load `step` on this one process (no DDP) and compare bitwise with what the worker saved.

    s3fs's cache is kept on purpose: the manager must see other processes' writes by itself."""
    state = fresh_objects()
    result = CheckpointManager(url, Runtime()).load(step, state)
    want = torch.load(expect / f"step{step}.pt", weights_only=True)
    for k, v in want["model"].items():
        assert torch.equal(state["model"].state_dict()[k], v), k
    got = state["optimizer"].state_dict()
    for i, st in want["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    assert got["param_groups"] == want["optimizer"]["param_groups"]
    assert state["scheduler"].state_dict() == want["scheduler"]
    assert torch.equal(state["counters"]["seen"], want["counters"]["seen"])
    assert result.saved_world_size == 2 and result.manifest["step"] == step
    mine = torch.load(expect / f"step{step}_rank0.pt", weights_only=True)
    assert result.per_rank is not None and torch.equal(result.per_rank["rng"], mine["rng"])


def latest_here(url: str) -> int | None:
    return CheckpointManager(url, Runtime()).latest()


def folders(url: str) -> dict[str, bool]:
    """step folder name -> committed, listed fresh."""
    listing = Storage(url).find()
    names = {rel.split("/")[0] for rel in listing if rel.startswith("step_")}
    return {n: f"{n}/{MANIFEST}" in listing for n in sorted(names)}


def test_two_rank_save_loads_bitwise_on_two_one_and_three_ranks(store, tmp_path, capsys):
    expect = tmp_path / "expect"
    expect.mkdir()
    launch.check(worker("save", store, expect, "--steps", "1,2,3", "--async-save", "--verify-load",
                        "--export", str(tmp_path / "model" / "model.pt")))
    assert json.loads((expect / "results.json").read_text()) == {"1": True, "2": True, "3": True}
    assert (expect / "loaded_step3_w2_rank0").exists() and (expect / "loaded_step3_w2_rank1").exists()
    assert folders(store) == {"step_0000000002": True, "step_0000000003": True}  # --n-saved 2

    manifest = json.loads(Storage(store).read_bytes("step_0000000003", MANIFEST))
    assert manifest["step"] == 3 and manifest["epoch"] == 3 and manifest["world_size"] == 2
    assert manifest["metrics"] == {"eval/accuracy": 0.03} and manifest["versions"]["torch"] == torch.__version__
    sizes = {f["name"]: f["size"] for f in manifest["files"]}
    actual = {k.split("/", 1)[1]: v for k, v in Storage(store).find().items() if k.startswith("step_0000000003/")}
    assert sizes == {k: v for k, v in actual.items() if k != MANIFEST}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(sizes)

    assert latest_here(store) == 3
    assert_loads_here(store, 3, expect)  # 1 process, no DDP: resharded and prefix-free
    launch.check(worker("load", store, expect, "--steps", "3", nproc=3))
    assert all((expect / f"loaded_step3_w3_rank{r}").exists() for r in range(3))  # rank 2: per_rank None

    exported = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    want = torch.load(expect / "step3.pt", weights_only=True)["model"]
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)

    # The CLI on the same real checkpoint.
    capsys.readouterr()
    assert cli_main(["checkpoints", "list", store, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["latest"]) for r in rows] == [(2, False), (3, True)]
    assert cli_main(["checkpoints", "show", f"{store}/step_0000000003", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["step"] == 3
    assert {"key": "model.0.weight", "dtype": "float32", "shape": [16, 8], "bytes": 512} in shown["tensors"]
    assert cli_main(["checkpoints", "verify", store, "--full"]) == 0
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "cli_model.pt"
    assert cli_main(["checkpoints", "export", f"{store}/step_0000000003", "--to", str(out)]) == 0
    cli_exported = torch.load(out, weights_only=True)
    assert cli_exported.keys() == want.keys() and all(torch.equal(cli_exported[k], want[k]) for k in want)


def test_sigkill_during_saves_and_retention_across_runs(store, tmp_path):
    """Four runs in one folder: three die at different points of a save, the fourth trains on."""
    expect = tmp_path / "expect"
    expect.mkdir()
    common = ["--n-saved", "2", "--keep-best", "eval/accuracy:max", "--metrics", json.dumps({"1": 0.9})]

    # Run 1: rank 1 dies after writing its shard of step 3, before DCP's metadata exists.
    r = worker("save", store, expect, "--steps", "1,2,3", "--fault", "write", "--fault-step", "3", *common)
    assert r.returncode != 0
    assert latest_here(store) == 2
    assert folders(store) == {"step_0000000001": True, "step_0000000002": True, "step_0000000003": False}
    assert_loads_here(store, 2, expect)

    # Run 2 resumes from 2, commits 3 over the leftovers, then rank 0 dies before committing 4.
    r = worker("save", store, expect, "--steps", "3,4", "--fault", "commit", "--fault-step", "4", *common)
    assert r.returncode != 0
    assert latest_here(store) == 3
    assert folders(store) == {"step_0000000001": True, "step_0000000002": True, "step_0000000003": True,
                              "step_0000000004": False}
    assert_loads_here(store, 3, expect)

    # Run 3 commits 4, then rank 0 dies while retention deletes step 2 (manifest already gone).
    r = worker("save", store, expect, "--steps", "4,5", "--fault", "retention", "--fault-step", "4", *common)
    assert r.returncode != 0
    assert latest_here(store) == 4
    assert folders(store) == {"step_0000000001": True, "step_0000000002": False, "step_0000000003": True,
                              "step_0000000004": True}
    assert_loads_here(store, 4, expect)

    # Run 4 trains on: the newest two plus the best (step 1) remain, leftovers of dead runs are gone.
    launch.check(worker("save", store, expect, "--steps", "5,6,7", "--verify-load", *common))
    assert folders(store) == {"step_0000000001": True, "step_0000000006": True, "step_0000000007": True}
    assert latest_here(store) == 7
    assert_loads_here(store, 1, expect)


def _outage_run(bucket: str, tmp_path: Path, on_error: str, steps: str):
    """Start a 2-rank save through a stoppable S3 server; stop it while rank 1 is inside its write of step 2."""
    expect, sync = tmp_path / "expect", tmp_path / "sync"
    expect.mkdir()
    sync.mkdir()
    server = StoppableS3Server().start()
    url = f"{bucket}/run"
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
    cmd = launch.torchrun_cmd(WORKER, ["save", "--url", url, "--expect", str(expect), "--sync", str(sync),
                                       "--steps", steps, "--fault", "pause", "--fault-step", "2",
                                       "--on-error", on_error])
    proc = subprocess.Popen(cmd, env=launch.child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for(sync / "paused", proc)
        server.stop()
        (sync / "resume").touch()
        if on_error == "warn":
            _wait_for(sync / "after2_rank0", proc)
            _wait_for(sync / "after2_rank1", proc)
            server.start()  # same port: the workers' endpoint is back
            (sync / "restarted").touch()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    return proc.returncode, out, url, expect


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout is not None else ""
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{out[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_s3_outage_stop_mode_fails_and_keeps_previous(s3_bucket, tmp_path):
    code, out, url, expect = _outage_run(s3_bucket, tmp_path, "stop", "1,2")
    assert code != 0, out
    assert out.count("CheckpointError: Could not save step 2") == 2, out[-4000:]  # both ranks agree
    assert latest_here(url) == 1
    assert folders(url).get("step_0000000002") in (None, False)
    assert_loads_here(url, 1, expect)


def test_s3_outage_warn_mode_trains_on_and_saves_when_back(s3_bucket, tmp_path):
    code, out, url, expect = _outage_run(s3_bucket, tmp_path, "warn", "1,2,3")
    assert code == 0, out[-4000:]
    assert json.loads((expect / "results.json").read_text()) == {"1": True, "2": False, "3": True}
    assert "Training goes on; the next save tries again" in out
    assert latest_here(url) == 3
    # Step 2 never commits. Its leftovers are cleaned after step 3 commits, unless a write of the
    # failed save that the client retried lands after that cleanup (seen once in a loaded CI run);
    # the next commit cleans those, so the promise tested is "never committed, never latest".
    seen = folders(url)
    assert seen.get("step_0000000002") in (None, False)
    assert {k: v for k, v in seen.items() if k != "step_0000000002"} == {"step_0000000001": True,
                                                                       "step_0000000003": True}
    assert_loads_here(url, 3, expect)


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket-[0-9a-f]+/run.*bucket .* does not exist"):
        CheckpointManager(f"s3://no-such-bucket-{time.time_ns():x}/run", Runtime()).latest()


def test_models_with_one_or_several_optimizers_round_trip(tmp_path):
    """A model with its one optimizer goes through get/set_state_dict together; a model with two
    optimizers (disjoint parameter sets) one call per optimizer. Both load back exactly."""

    def objects(seed: int) -> dict:
        torch.manual_seed(seed)
        gen, disc = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        state: dict[str, Any] = {"gen": gen, "gen_opt": torch.optim.Adam(gen.parameters(), lr=0.01), "disc": disc,
                 "disc_a": torch.optim.SGD(disc[0].parameters(), lr=0.1, momentum=0.9),
                 "disc_b": torch.optim.Adam(disc[1].parameters(), lr=0.02)}
        disc(gen(torch.randn(5, 3))).sum().backward()
        for name in ("gen_opt", "disc_a", "disc_b"):
            state[name].step()
        return state

    def tensors(state: dict) -> dict[str, torch.Tensor]:
        out = {f"{m}.{k}": v for m in ("gen", "disc") for k, v in state[m].state_dict().items()}
        for name in ("gen_opt", "disc_a", "disc_b"):
            sd = state[name].state_dict()
            out.update({f"{name}.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()})
        return out

    saved = objects(0)
    manager = CheckpointManager(str(tmp_path / "ck"), Runtime())
    manager.save(1, saved, per_rank={}, manifest={})
    loaded = objects(1)
    assert not all(torch.equal(v, tensors(loaded)[k]) for k, v in tensors(saved).items())
    manager.load(1, loaded)
    expect, got = tensors(saved), tensors(loaded)
    assert expect.keys() == got.keys()
    assert all(torch.equal(v, got[k]) for k, v in expect.items())
