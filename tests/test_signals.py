"""The stop flag: handlers set a flag only, the user's handlers come back, a second signal aborts."""

import itertools
import json
import os
import signal
import subprocess
import sys

from igniter_dist.signals import StopFlag


def test_handlers_set_a_flag_and_the_users_handlers_are_restored():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        flag = StopFlag(distributed=False)
        flag.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.poll() == (signal.SIGTERM, False)
        assert seen == []  # ours took it
        flag.restore()
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the user's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_ctrl_c_aborts_at_once_with_128_plus_signum():
    code = ("import os, signal, time; from igniter_dist.signals import StopFlag; f = StopFlag(False); f.install(); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(1.2); os.kill(os.getpid(), signal.SIGINT); "
            "time.sleep(5); print('not aborted')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "not aborted" not in result.stdout
    assert "second SIGINT, aborting without saving" in result.stderr


def test_the_same_stop_delivered_twice_is_one_stop():
    """scancel and container stops signal every process while torchrun forwards its own copy; launchers follow
    SIGTERM with SIGKILL. Neither a repeated SIGTERM nor a SIGINT repeated at once aborts the save."""
    code = ("import os, signal, time; from igniter_dist.signals import StopFlag; f = StopFlag(False); f.install(); "
            "[os.kill(os.getpid(), s) for s in (signal.SIGTERM, signal.SIGTERM, signal.SIGHUP, signal.SIGTERM)]; "
            "time.sleep(1.2); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('kept', f.requested); "
            "g = StopFlag(False); g.install(); os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), "
            "signal.SIGINT); time.sleep(0.2); print('kept', g.requested)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [f"kept {int(signal.SIGTERM)}", f"kept {int(signal.SIGINT)}"]
    assert "aborting" not in result.stderr


def test_loader_workers_ignore_the_stop_signals_and_run_the_users_worker_init(tmp_path):
    """A worker started by a protected loader survives SIGTERM, SIGINT and SIGHUP to its process group and still
    runs the script's own worker_init_fn; the rank shuts it down."""
    code = f"""
import json, os, signal, time
from torch.utils.data import DataLoader, Dataset
from igniter_dist.signals import StopFlag, protect_workers, start_iterator, stop_workers

def mark(worker_id):
    open(os.path.join({str(tmp_path)!r}, f"init{{worker_id}}"), "w").close()

class Slow(Dataset):
    def __len__(self): return 1000
    def __getitem__(self, i):
        time.sleep(0.05)
        return os.getpid()

flag = StopFlag(False); flag.install()
loader = DataLoader(Slow(), batch_size=1, num_workers=2, worker_init_fn=mark)
protect_workers(loader); protect_workers(loader)  # idempotent
it = start_iterator(loader)
pids = {{int(next(it)) for _ in range(6)}}
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    os.killpg(os.getpgid(0), sig)
    time.sleep(0.2)
pids |= {{int(next(it)) for _ in range(6)}}
stop_workers(it)
gone = all(not os.path.exists(f"/proc/{{p}}") or open(f"/proc/{{p}}/stat").read().split()[2] == "Z" for p in pids)
print(json.dumps({{"pids": sorted(pids), "requested": flag.requested, "gone": gone,
                  "inits": sorted(os.listdir({str(tmp_path)!r}))}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert len(seen["pids"]) == 2  # the same two workers before and after the signals
    assert seen["requested"] == signal.SIGTERM  # the rank took the first stop; the others were the same stop
    assert seen["inits"] == ["init0", "init1"] and seen["gone"]


CHECK_SCHEDULE = """
import sys, time
import torch.distributed as dist
from igniter_dist.signals import StopFlag
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
for step_s in (0.0, 0.3):
    flag, checks = StopFlag(True, check_every=10), []
    for step in range(1, 13 if step_s else 41):
        time.sleep(step_s)
        pending = flag._pending
        flag.poll()
        if flag._pending is not pending:
            checks.append(step)
    flag.drain()
    print(step_s, checks)
dist.destroy_process_group()
"""


def test_agreement_checks_every_step_until_timed_then_every_10_fast_steps(tmp_path):
    """Fast steps settle at one agreement per 10 steps; slow ones (0.3 s > CHECK_SECONDS) check every step."""
    result = subprocess.run([sys.executable, "-c", CHECK_SCHEDULE, str(tmp_path / "store")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fast, slow = (eval(line.split(" ", 1)[1]) for line in result.stdout.splitlines())
    assert fast[:2] == [1, 2]  # the first check times nothing yet: the next one comes a step later
    assert all(b - a == 10 for a, b in itertools.pairwise(fast[3:])) and len(fast) <= 8, fast
    assert slow == list(range(1, 13)), slow
