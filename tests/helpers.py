"""Helpers shared by test modules: what a checkpoint folder holds, what the probes report, stops as launchers
deliver them, a SageMaker container's /opt/ml. Test modules import from here, never from each other."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from launch import child_env


def committed_steps(ckpt: Path) -> list[int]:
    """The steps of `ckpt` whose commit marker (manifest.json) exists, ascending."""
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*") if (p / "manifest.json").exists())


def final_reports(folder: Path) -> list[dict]:
    """The final reports the resume probe's ranks wrote (rank<R>_attempt<A>_<pid>.json), by rank."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


# ---------------------------------------------------------------- stops, delivered as launchers deliver them

# How each launcher stops a job (FACTS.md: torchrun starts every worker in a session of its own).
DELIVERIES = {
    # Kubernetes, `kill`, SageMaker (PID 1 is torchrun, or the entrypoint exec'd into it): the launcher only.
    "sigterm-to-torchrun": "SIGTERM to the torchrun process alone; torchrun forwards it to each worker's group",
    # Slurm's scancel, a container runtime that signals every process: all of them at once, workers included.
    "sigterm-to-every-process": "SIGTERM to torchrun, every rank and every DataLoader worker at once",
    # Ctrl-C: the terminal signals its foreground process group.
    "sigint-to-foreground-group": "SIGINT to the launched process's group, as a terminal's Ctrl-C",
}


@dataclass
class Stopped:
    """A job stopped from outside: how it ended, and the processes it had when the signal went out."""

    returncode: int
    stdout: str
    stderr: str
    tree: dict[int, list[int]]  # at the signal: each process of the job -> its children


def process_tree(pid: int) -> dict[int, list[int]]:
    """`pid` and its descendants, each with its children's pids."""
    root = psutil.Process(pid)
    return {p.pid: [c.pid for c in p.children()] for p in [root, *root.children(recursive=True)]}


def stop_like_a_launcher(cmd: list[str], delivery: str, markers: list[Path], *, env: dict[str, str] | None = None,
                         cwd: Path | None = None, timeout: float = 180) -> Stopped:
    """Start `cmd` in a session of its own, wait until every marker file exists (each rank holds its step
    until a signal reaches it), stop it by `delivery` (a key of DELIVERIES) and wait for it to end."""
    p = subprocess.Popen(cmd, env=child_env(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not all(m.exists() for m in markers):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the job never reached its stop point (exit {p.poll()})")
            time.sleep(0.05)
        tree = process_tree(p.pid)
        if delivery == "sigterm-to-torchrun":
            os.kill(p.pid, signal.SIGTERM)
        elif delivery == "sigterm-to-every-process":
            for pid in tree:
                os.kill(pid, signal.SIGTERM)
        elif delivery == "sigint-to-foreground-group":
            os.killpg(p.pid, signal.SIGINT)
        else:
            raise ValueError(f"unknown delivery {delivery!r}; one of {sorted(DELIVERIES)}")
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(p.pid).children(recursive=True):
                child.kill()
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{cmd}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}") from None
    return Stopped(p.returncode, out, err, tree)


def still_running(pids: list[int]) -> list[int]:
    """Those of `pids` that are alive (not zombies) after a few seconds' grace."""
    deadline = time.monotonic() + 10
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- SageMaker's container layout


def sagemaker_layout(base: Path, host: str, hosts: list[str], hyperparameters: dict[str, str] | None = None,
                     channels: dict[str, dict[str, bytes]] | None = None) -> Path:
    """Lay out `base` as /opt/ml looks on `host`: config files, and channel folders with their files."""
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": hosts, "network_interface_name": "eth0"}))
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters or {}))
    channels = channels or {}
    (config / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"} for name in channels}))
    for name, files in channels.items():
        folder = base / "input" / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, content in files.items():
            (folder / fname).write_bytes(content)
    for sub in ("model", "output/data", "checkpoints"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base
