"""Run a command under a timeout, and stop everything it started when the timeout comes.

``subprocess.run(timeout=)`` kills the command alone. torchrun starts its workers in sessions of
their own, so a hung NCCL step would leave ranks holding the GPUs: here the command gets SIGTERM
first, which torchrun passes on to its workers, then SIGKILL.
"""
import os
import signal
import subprocess

# torchrun, sent SIGTERM, stops its workers (SIGTERM, then SIGKILL 30 s later); then it is killed too.
STOP_GRACE_S = 45


def _signal_group(process, kill=False):
    """SIGTERM (or SIGKILL) to the command's process group; on Windows, to the command alone."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        else:
            process.kill() if kill else process.terminate()
    except (ProcessLookupError, PermissionError):
        pass


def run_command(command, timeout, env):
    """(exit code, stdout, stderr) of ``command``; exit code None when it ran past ``timeout``.

    The command runs in a process group of its own. When it runs too long (or the caller is
    interrupted), the group gets SIGTERM first: torchrun starts its workers in sessions of their
    own, out of reach of a group kill, and only stops them itself; a training run stops cleanly
    on it. What is still there STOP_GRACE_S later gets SIGKILL."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:  # Ctrl-C: the step has no terminal of its own to get it from
        _stop(process)
        raise
    out, err = _stop(process)
    return code, out, err


def _stop(process):
    """SIGTERM to the command's group, SIGKILL after STOP_GRACE_S; (stdout, stderr) read so far.
    Output is given up on if a child that escaped both still holds the pipes."""
    _signal_group(process)
    try:
        return process.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, kill=True)
        process.kill()
    try:
        return process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.stdout.close()
        process.stderr.close()
        process.wait()
        return "", ""
