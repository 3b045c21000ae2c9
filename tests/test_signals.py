"""The stop flag: handlers set a flag only, the user's handlers come back, a second signal aborts."""

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
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not aborted')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "not aborted" not in result.stdout
    assert "second SIGINT, aborting without saving" in result.stderr
