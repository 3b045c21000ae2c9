"""Start real processes for tests: plain python or torchrun agents on 127.0.0.1 with free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def torchrun_cmd(script: str | Path, args: list[str], nproc: int = 2, *, nnodes: int = 1,
                 node_rank: int = 0, port: int | None = None, extra: list[str] | None = None) -> list[str]:
    return [
        PYTHON, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={port or free_port()}",
        *(extra or []), str(script), *args,
    ]


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run to completion, capturing text output; kills the whole process group on timeout."""
    p = subprocess.Popen(cmd, env=child_env(env), cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n--- stdout\n{out}\n--- stderr\n{err}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun(script: str | Path, args: list[str], nproc: int = 2, *, env: dict[str, str] | None = None,
             timeout: float = 300, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return run(torchrun_cmd(script, args, nproc), env=env, timeout=timeout, cwd=cwd)


def python(script: str | Path, args: list[str], *, env: dict[str, str] | None = None,
           timeout: float = 300, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return run([PYTHON, str(script), *args], env=env, timeout=timeout, cwd=cwd)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with both output streams when the process failed."""
    assert result.returncode == 0, (
        f"exit {result.returncode}: {result.args}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result
