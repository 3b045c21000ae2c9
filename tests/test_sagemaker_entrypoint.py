"""The SageMaker container contract, simulated: /opt/ml in a temp folder, two hosts on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import sagemaker_layout as layout

from igniter_dist import sagemaker  # the answers a script reads
from igniter_dist.errors import ConfigError
from igniter_dist.sagemaker import contract
from igniter_dist.sagemaker.entrypoint import display, plan_node, resolve_script, torchrun_argv, wait_for_host
from igniter_dist.sagemaker.launcher import make_archive
from launch import PYTHON, ROOT, child_env, free_port, run

PROBE = ROOT / "tests" / "workers" / "sagemaker_probe.py"
HOSTS = ["algo-2", "algo-1"]  # unsorted on purpose: SageMaker's order is not promised


@pytest.fixture
def job(tmp_path, monkeypatch):
    """This process inside a simulated job on algo-1; the toolkit's SM_* variables absent, as in our image."""
    for key in list(os.environ):
        if key.startswith("SM_") or key in ("TRAINING_JOB_NAME", "SAGEMAKER_HOST_ADDRESSES"):
            monkeypatch.delenv(key)
    base = layout(tmp_path / "ml", "algo-1", HOSTS, {
        "epochs": "3", "flag": "True", "optimizer": '"adam"',
        "sagemaker_program": '"train.py"', "sagemaker_region": '"us-east-1"',
    }, {"train": {"a.txt": b"a"}, "eval": {"b.txt": b"b"}})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    return base


# The contract, read from the files

def resource_config() -> sagemaker.ResourceConfig:
    """The job's resource config, which the test laid out."""
    config = sagemaker.resource_config()
    assert config is not None, "no resourceconfig.json"
    return config


def test_outside_a_job_nothing_is_claimed(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("SM_") or key == "TRAINING_JOB_NAME":
            monkeypatch.delenv(key)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    assert not sagemaker.in_sagemaker()
    assert sagemaker.resource_config() is None
    assert (sagemaker.model_dir(), sagemaker.output_dir(), sagemaker.channel_dir("train"),
            sagemaker.checkpoint_dir(), sagemaker.job_name()) == (None, None, None, None, None)


def test_files_give_hosts_dirs_and_hyperparameters(job, monkeypatch):
    assert sagemaker.in_sagemaker()
    config = resource_config()
    assert config.hosts == ("algo-1", "algo-2") and config.current_host == "algo-1" and config.node_rank == 0
    assert sagemaker.model_dir() == str(job / "model")
    assert sagemaker.output_dir() == str(job / "output" / "data")
    assert sagemaker.channel_dir("train") == str(job / "input" / "data" / "train")
    assert sagemaker.channel_dir("missing") is None
    assert sagemaker.checkpoint_dir() == str(job / "checkpoints")
    hps = sagemaker.hyperparameters()
    assert hps == {"epochs": "3", "flag": "True", "optimizer": "adam",
                   "sagemaker_program": "train.py", "sagemaker_region": "us-east-1"}
    assert contract.script_hyperparameters(hps) == ["--epochs", "3", "--flag", "True", "--optimizer", "adam"]
    assert sagemaker.job_name() is None
    monkeypatch.setenv("TRAINING_JOB_NAME", "digits-2026")
    assert sagemaker.job_name() == "digits-2026"


def test_toolkit_variables_win_over_files(job, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/elsewhere/model")
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/elsewhere/train")
    assert sagemaker.model_dir() == "/elsewhere/model"
    assert sagemaker.channel_dir("train") == "/elsewhere/train"
    env = contract.toolkit_environment(resource_config(), 0)
    assert "SM_MODEL_DIR" not in env and "SM_CHANNEL_TRAIN" not in env
    assert env["SM_CHANNEL_EVAL"] == str(job / "input" / "data" / "eval")
    assert json.loads(env["SM_HOSTS"]) == ["algo-1", "algo-2"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["SM_NUM_GPUS"] == "0"


def test_checkpoint_dir_takes_an_s3_hyperparameter(tmp_path, monkeypatch):
    base = layout(tmp_path, "algo-1", ["algo-1"], {"checkpoint-dir": "s3://bucket/run1"})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    assert sagemaker.checkpoint_dir() == "s3://bucket/run1"


def test_hosts_sort_by_number_and_current_host_must_be_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    hosts = [f"algo-{i}" for i in (10, 2, 1, 3)]
    layout(tmp_path, "algo-10", hosts)
    config = resource_config()
    assert config.hosts == ("algo-1", "algo-2", "algo-3", "algo-10") and config.node_rank == 3
    layout(tmp_path, "algo-9", hosts)
    with pytest.raises(ConfigError, match="algo-9"):
        sagemaker.resource_config()


def test_host_addresses_test_hook(monkeypatch):
    monkeypatch.delenv("SAGEMAKER_HOST_ADDRESSES", raising=False)
    assert contract.host_address("algo-1") == "algo-1"
    monkeypatch.setenv("SAGEMAKER_HOST_ADDRESSES", "algo-1=127.0.0.1, algo-2=127.0.0.2")
    assert contract.host_address("algo-2") == "127.0.0.2"
    monkeypatch.setenv("SAGEMAKER_HOST_ADDRESSES", "algo-1")
    with pytest.raises(ConfigError, match="host=address"):
        contract.host_address("algo-1")


# The torchrun command, as a pure function

def test_torchrun_argv_for_the_second_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    layout(tmp_path, "algo-2", HOSTS)
    plan = plan_node(resource_config(), {"lr": "0.1", "resume": "True", "sagemaker_program": "x.py"},
                     "train.py", ["--given", "1"], nproc_per_node=8, master_port=7777)
    assert torchrun_argv(plan, python="python") == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1", "--nproc-per-node=8",
        "--master-addr=algo-1", "--master-port=7777",
        "train.py", "--given", "1", "--lr", "0.1", "--resume", "True",
    ]
    with pytest.raises(ConfigError, match="nproc-per-node"):
        plan_node(resource_config(), {}, "train.py", [], nproc_per_node=0, master_port=7777)


def test_script_comes_from_sagemaker_program_when_started_as_train():
    assert resolve_script("mine.py", {"sagemaker_program": "x.py"}) == "mine.py"
    assert resolve_script("train", {"sagemaker_program": "x.py"}) == "x.py"
    assert resolve_script(None, {"sagemaker_program": "x.py"}) == "x.py"
    with pytest.raises(ConfigError, match="sagemaker_program"):
        resolve_script("train", {})


def test_logged_command_redacts_secrets():
    shown = display(["python", "t.py", "--mlflow-token", "abc", "--api-key=xyz", "--lr", "0.1"])
    assert "abc" not in shown and "xyz" not in shown and "--lr 0.1" in shown


def test_print_only_through_the_cli(job):
    out = subprocess.run(
        [PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", "--print-only", "--nproc-per-node", "2", "train"],
        env=child_env({"SAGEMAKER_BASE_DIR": str(job), "SM_MASTER_PORT": "29999"}),
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[3:] == ["--nnodes=2", "--node-rank=0", "--nproc-per-node=2", "--master-addr=algo-1",
                                      "--master-port=29999", "train.py", "--epochs", "3", "--flag", "True",
                                      "--optimizer", "adam"]


def test_outside_a_job_the_entrypoint_says_so(tmp_path):
    out = subprocess.run([PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", "x.py"],
                         env=child_env({"SAGEMAKER_BASE_DIR": str(tmp_path)}), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "not inside a SageMaker job" in out.stderr


# The master host's name must resolve

UNRESOLVED_FIX = ("; if the job runs in a VPC, enable DNS resolution and DNS hostnames there, "
                  "or raise --resolve-timeout / IGNITER_DIST_RESOLVE_TIMEOUT.")


def test_wait_for_host_returns_at_once_or_gives_up_in_time():
    wait_for_host("localhost", timeout_s=5)
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        wait_for_host("algo-1.invalid", timeout_s=1.5)  # .invalid never resolves (RFC 6761)
    assert 1.5 <= time.monotonic() - started < 30
    assert str(e.value).startswith("the master host algo-1.invalid did not resolve within 1.5 s (")
    assert str(e.value).endswith(UNRESOLVED_FIX)


def test_resolve_timeout_setting(monkeypatch):
    monkeypatch.delenv("IGNITER_DIST_RESOLVE_TIMEOUT", raising=False)
    assert contract.resolve_timeout() == 60
    monkeypatch.setenv("IGNITER_DIST_RESOLVE_TIMEOUT", "2.5")
    assert contract.resolve_timeout() == 2.5
    for bad in ("0", "soon", "nan"):
        monkeypatch.setenv("IGNITER_DIST_RESOLVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"IGNITER_DIST_RESOLVE_TIMEOUT must be a positive number of seconds, "
                                              f"got '{bad}'"):
            contract.resolve_timeout()


def unresolvable_job(tmp_path: Path) -> Path:
    """algo-2 of a job whose master, algo-1.invalid, never resolves (RFC 6761)."""
    base = layout(tmp_path / "ml", "algo-2", ["algo-1.invalid", "algo-2"], {"sagemaker_program": "train.py"})
    (base / "code").mkdir()
    (base / "code" / "train.py").write_text("raise SystemExit('torchrun started: the wait did not stop it')\n")
    return base


def test_unresolvable_master_fails_within_the_timeout(tmp_path):
    """The host stops in seconds with one sentence, instead of torchrun retrying for many minutes."""
    base = unresolvable_job(tmp_path)
    env = {"SAGEMAKER_BASE_DIR": str(base), "SM_NUM_GPUS": "0", "IGNITER_DIST_RESOLVE_TIMEOUT": "3"}
    started = time.monotonic()
    result = run([PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", "train"], env=env, cwd=base / "code",
                 timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert lines[0] == "igniter-dist: waiting up to 3 s for the master host algo-1.invalid to resolve"
    assert lines[-1].startswith("igniter-dist: error: the master host algo-1.invalid did not resolve within 3 s (")
    assert lines[-1].endswith(UNRESOLVED_FIX) and len(lines) == 2
    # SageMaker reports /opt/ml/output/failure as the job's FailureReason.
    assert (base / "output" / "failure").read_text() == lines[-1].removeprefix("igniter-dist: error: ") + "\n"
    assert elapsed < 60  # loose: interpreter startup included, on a loaded machine


def test_resolve_timeout_option_wins_over_the_variable(tmp_path, monkeypatch):
    from igniter_dist.sagemaker import entrypoint

    for key in [k for k in os.environ if k.startswith("SM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(unresolvable_job(tmp_path)))
    monkeypatch.setenv("SM_NUM_GPUS", "0")
    monkeypatch.setenv("IGNITER_DIST_RESOLVE_TIMEOUT", "600")
    parser = argparse.ArgumentParser()
    entrypoint.register(parser)
    args = parser.parse_args(["--resolve-timeout", "1", "train"])
    with pytest.raises(ConfigError, match="did not resolve within 1 s"):
        entrypoint.run(args)


# Two simulated hosts, for real

def _start_hosts(tmp_path: Path, hyperparameters: dict[str, str]) -> tuple[list[subprocess.Popen], Path]:
    """Two entrypoint processes, one per host, each in its own session like a container's PID 1.

    The probe travels as the launcher sends code: sourcedir.tar.gz in the `code` channel.
    """
    src = tmp_path / "src"
    src.mkdir()
    (src / "probe.py").write_text(PROBE.read_text())
    archive = make_archive(src, tmp_path / "sourcedir.tar.gz").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    hps = {"sagemaker_program": "probe.py", "sagemaker_job_name": '"job"', "out": str(out), **hyperparameters}
    port = free_port()
    procs = []
    for host in ("algo-1", "algo-2"):
        base = layout(tmp_path / host, host, ["algo-2", "algo-1"], hps,
                      {"code": {"sourcedir.tar.gz": archive}, "train": {"x.txt": b"x"}})
        env = child_env({"SAGEMAKER_BASE_DIR": str(base), "SM_MASTER_PORT": str(port),
                         "SAGEMAKER_HOST_ADDRESSES": "algo-1=127.0.0.1,algo-2=127.0.0.1",
                         "TRAINING_JOB_NAME": "simulated", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "20"})
        for key in [k for k in env if k.startswith("SM_") and k != "SM_MASTER_PORT"]:
            env.pop(key)
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", "train"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs, out


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            output, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            output, _ = p.communicate()
            raise AssertionError(f"host did not finish in {timeout}s:\n{output[-4000:]}") from None
        results.append((p.returncode, output))
    return results


def test_two_hosts_run_one_job(tmp_path):
    procs, out = _start_hosts(tmp_path, {"epochs": "3", "flag": "True"})
    for code, output in _finish(procs, timeout=240):
        assert code == 0, output[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, rec in enumerate(records):
        host = f"algo-{rank + 1}"  # node rank = index among the sorted hosts
        assert rec["world_size"] == 2 and rec["sum"] == 3
        assert rec["group_rank"] == rank and rec["local_rank"] == 0
        assert rec["epochs"] == "3" and rec["flag"] == "True" and rec["unknown"] == []
        assert not any(a.startswith("--sagemaker") for a in rec["argv"])
        assert rec["cwd"] == str(tmp_path / host / "code")  # unpacked from the code channel
        assert rec["env"]["SM_CURRENT_HOST"] == host
        assert json.loads(rec["env"]["SM_HOSTS"]) == ["algo-1", "algo-2"]
        assert rec["env"]["SM_CHANNEL_TRAIN"] == str(tmp_path / host / "input" / "data" / "train")
        assert rec["env"]["SM_MODEL_DIR"] == str(tmp_path / host / "model")


def test_sigterm_to_the_entrypoints_reaches_the_workers(tmp_path):
    procs, out = _start_hosts(tmp_path, {"sleep": "true"})
    deadline = time.monotonic() + 180
    while not all((out / f"ready{r}").exists() for r in (0, 1)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("workers never became ready:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.2)
    for p in procs:  # exec-form: the entrypoint's PID now is torchrun itself
        assert b"torch.distributed.run" in Path(f"/proc/{p.pid}/cmdline").read_bytes()
        os.kill(p.pid, signal.SIGTERM)  # to the PID alone, as docker stop signals PID 1
    results = _finish(procs, timeout=60)
    for rank in (0, 1):
        assert (out / f"term{rank}").read_text() == str(int(signal.SIGTERM)), results[rank][1][-3000:]
    assert all(code != 0 for code, _ in results)
    for rank in (0, 1):
        pid = json.loads((out / f"rank{rank}.json").read_text())["pid"]
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
