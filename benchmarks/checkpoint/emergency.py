"""SIGTERM a 2-rank torchrun job of the digits example mid-training; time the emergency save and the resume.

The signal goes to the torchrun agent, as a SageMaker stop or spot interruption sends it; the agent
forwards it to the workers. Times come from this process's clock, the committed manifest's
`unix_time` (written by rank 0 as the save's last act) and the save duration igniter-dist prints.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import ROOT, child_env, torchrun_cmd

DIGITS = ROOT / "examples" / "digits" / "train.py"
SIGNAL_AFTER_STEP = 10  # SIGTERM goes out once rank 0 has logged this step


def _launch(workdir: Path, hidden: int, max_epochs: int) -> subprocess.Popen:
    args = ["--max-epochs", str(max_epochs), "--checkpoint-dir", str(workdir / "checkpoints"),
            "--output-dir", str(workdir / "output"), "--save-every", "0", "--eval-every", "0",
            "--log-every", "5", "--hidden", str(hidden)]
    return subprocess.Popen(torchrun_cmd(sys.executable, DIGITS, args, 2), env=child_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)


def _lines_until(p: subprocess.Popen, marker: str, timeout: float, log: list[str]) -> float:
    """Read output until a line containing `marker`; the wall time it arrived."""
    deadline = time.time() + timeout
    assert p.stdout is not None
    for line in p.stdout:
        log.append(line)
        if marker in line:
            return time.time()
        if time.time() > deadline:
            break
    raise RuntimeError(f"never saw {marker!r}; output:\n{''.join(log[-40:])}")


def _seconds_per_step(log: list[str]) -> float | None:
    """The step time rank 0 last logged before the signal (its console line carries it)."""
    for line in reversed(log):
        m = re.search(r"train/seconds_per_step (\S+)", line)
        if m:
            return float(m.group(1))
    return None


def _reported_save_s(log: list[str]) -> float | None:
    """The duration rank 0 reports for its emergency save ("igniter-dist: saved step N in X s after ...")."""
    for line in log:
        m = re.search(r"igniter-dist: saved step \d+ in (\S+) s", line)
        if m:
            return float(m.group(1))
    return None


def _committed(checkpoints: Path) -> dict:
    manifests = sorted(checkpoints.glob("step_*/manifest.json"))
    if not manifests:
        raise RuntimeError(f"no committed checkpoint in {checkpoints}")
    return json.loads(manifests[-1].read_text())


def measure(workdir: Path, hidden: int, timeout: float = 300) -> dict:
    """Train, SIGTERM once steady, wait for exit; then relaunch and time the resume."""
    log: list[str] = []
    p = _launch(workdir, hidden, max_epochs=100_000)
    try:
        _lines_until(p, f"step {SIGNAL_AFTER_STEP} ", timeout, log)  # past start-up and warm-up
        step_s = _seconds_per_step(log)
        t_signal = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.stdout is not None
        log += p.stdout.readlines()
        rc = p.wait(timeout)
        t_exit = time.time()
    finally:
        if p.poll() is None:
            p.kill()
    manifest = _committed(workdir / "checkpoints")
    t_commit = float(manifest["unix_time"])

    resumed_log: list[str] = []
    t_launch = time.time()
    p = _launch(workdir, hidden, max_epochs=int(manifest.get("epoch", 0)) + 1)
    try:
        t_resumed = _lines_until(p, "resumed from", timeout, resumed_log)
        assert p.stdout is not None
        resumed_log += p.stdout.readlines()
        rc_resume = p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()
    (workdir / "sigterm.log").write_text("".join(log))
    (workdir / "resume.log").write_text("".join(resumed_log))
    return {
        "hidden": hidden,
        "checkpoint_mb": sum(f["size"] for f in manifest.get("files", [])) / 1e6,
        "saved_step": manifest.get("step"),
        "signal_after_step": SIGNAL_AFTER_STEP,
        "seconds_per_step": step_s,
        "exit_code": rc,
        "reported_save_s": _reported_save_s(log),
        "signal_to_commit_s": t_commit - t_signal,
        "commit_to_exit_s": t_exit - t_commit,
        "signal_to_exit_s": t_exit - t_signal,
        "relaunch_to_resumed_s": t_resumed - t_launch,
        "resume_exit_code": rc_resume,
    }
