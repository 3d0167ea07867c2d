"""triplet.bench.commands: a command past its timeout is stopped, with what it started.
(The torchrun-like launcher is tested through gpu-check's run_step in tests/test_gpu_check.py.)"""
import os
import sys
import time

from triplet.bench import commands


def test_a_step_that_ignores_sigterm_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(commands, "STOP_GRACE_S", 1)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('up', flush=True); time.sleep(600)"]
    started = time.monotonic()
    code, out, err = commands.run_command(stubborn, 6, dict(os.environ))
    assert code is None and out == "up\n" and time.monotonic() - started < 20  # output so far is kept
