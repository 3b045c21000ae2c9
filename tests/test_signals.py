"""The stop flag: handlers set a flag only, the user's handlers come back, a second signal aborts."""

import itertools
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


def test_a_second_signal_aborts_at_once_with_128_plus_signum():
    code = ("import os, signal, time; from igniter_dist.signals import StopFlag; f = StopFlag(False); f.install(); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); "
            "print('not aborted')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "not aborted" not in result.stdout
    assert "second SIGINT, aborting without saving" in result.stderr


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
