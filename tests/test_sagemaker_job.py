"""The digits example as a simulated two-instance SageMaker job: train, stop with SIGTERM, resume.

Each "instance" is an `igniter-dist sagemaker-entrypoint` process with its own /opt/ml folder;
the checkpoint folder is shared by both, standing in for the S3 URI that the launcher passes to
multi-instance jobs as the `checkpoint-dir` hyperparameter.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_sagemaker_entrypoint import layout

from launch import PYTHON, ROOT, child_env, free_port

EXAMPLE = ROOT / "examples" / "digits" / "train.py"
STEPS_PER_EPOCH = 45  # 1,438 training images over 2 ranks in batches of 16: ceil(719 / 16)
EPOCHS = 6
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/digits/train.py is not there yet")


def digits_npz() -> bytes:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    buf = io.BytesIO()
    np.savez(buf, images=digits.images, labels=digits.target)
    return buf.getvalue()


def start_job(tmp_path: Path, hyperparameters: dict[str, str], data: bytes) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for host in ("algo-1", "algo-2"):
        base = layout(tmp_path / host, host, ["algo-1", "algo-2"], hyperparameters, {"data": {"digits.npz": data}})
        env = child_env({"SAGEMAKER_BASE_DIR": str(base), "SM_MASTER_PORT": str(port),
                         "SAGEMAKER_HOST_ADDRESSES": "algo-1=127.0.0.1,algo-2=127.0.0.1",
                         "TRAINING_JOB_NAME": "digits-simulated", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"})
        for key in [k for k in env if k.startswith("SM_") and k != "SM_MASTER_PORT"]:
            env.pop(key)
        log = open(tmp_path / f"{host}.log", "a")
        procs.append(subprocess.Popen([PYTHON, "-m", "igniter_dist.cli", "sagemaker-entrypoint", str(EXAMPLE)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen], tmp_path: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError(f"job did not end in {timeout}s:\n{logs(tmp_path)}") from None
    return codes


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {h}\n{(tmp_path / f'{h}.log').read_text()[-3000:]}" for h in ("algo-1", "algo-2"))


def committed_steps(ckpt: Path) -> list[int]:
    from igniter_dist.checkpoint.layout import MANIFEST, parse_step

    if not ckpt.exists():
        return []
    steps = (parse_step(d.name) for d in ckpt.iterdir() if (d / MANIFEST).exists())
    return sorted(s for s in steps if s is not None)


def test_digits_job_trains_stops_on_sigterm_and_resumes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    hps = {"max-epochs": str(EPOCHS), "batch-size": "16", "save-every": "0", "log-every": "20", "resume": "True",
           "checkpoint-dir": str(ckpt), "sagemaker_job_name": '"digits-simulated"'}
    data = digits_npz()

    procs = start_job(tmp_path, hps, data)
    deadline = time.monotonic() + 180
    while f"epoch 1/{EPOCHS}" not in (tmp_path / "algo-1.log").read_text():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            wait_all(procs, tmp_path, timeout=5)
            raise AssertionError(f"training never started:\n{logs(tmp_path)}")
        time.sleep(0.1)
    for p in procs:  # SageMaker's stop: SIGTERM to each instance's main process
        os.kill(p.pid, signal.SIGTERM)
    codes = wait_all(procs, tmp_path, timeout=120)
    assert all(c != 0 for c in codes), logs(tmp_path)
    steps = committed_steps(ckpt)
    # --save-every 0 saves only at the end: a checkpoint now can only be the SIGTERM save.
    assert len(steps) == 1 and 0 < steps[0] < EPOCHS * STEPS_PER_EPOCH, logs(tmp_path)
    assert not (tmp_path / "algo-1" / "model" / "model.pt").exists()

    procs = start_job(tmp_path, hps, data)  # SageMaker restarts the interrupted job
    codes = wait_all(procs, tmp_path, timeout=300)
    assert codes == [0, 0], logs(tmp_path)
    log = (tmp_path / "algo-1.log").read_text()
    assert "resumed from" in log and f"step {steps[0]}" in log, log[-3000:]
    accuracy = float(log.rsplit("final eval accuracy", 1)[1].split()[0])
    assert accuracy > 0.9
    assert (tmp_path / "algo-1" / "model" / "model.pt").exists()
    saved = json.loads((tmp_path / "algo-1" / "model" / "args.json").read_text())
    assert saved["max_epochs"] == EPOCHS and saved["data"] == str(tmp_path / "algo-1" / "input" / "data" / "data")
    assert committed_steps(ckpt)[-1] == EPOCHS * STEPS_PER_EPOCH  # the final save, after every epoch ran
