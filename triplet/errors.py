"""Failures a user can cause and fix, and the exit status each kind ends a script with.

| status | meaning |
| --- | --- |
| 0 | done |
| 1 | a bug: an unexpected exception (its traceback is printed) |
| 2 | a usage or input error: a bad option, a missing or damaged file (``UserError``), or more than the machine has (memory) |
| 3 | a quality gate refused the result: an ONNX export that disagrees with torch, or an INT8 model that loses more than ``--max-drop`` (``QualityGateError``); the rejected file is kept aside |
| 130 | interrupted (Ctrl-C or SIGTERM); what was written is intact |
"""

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_QUALITY_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UserError(Exception):
    """A failure the user can fix; scripts print it as one line and exit with ``exit_code``."""

    exit_code = EXIT_USAGE


class QualityGateError(UserError):
    """The program worked, but its result failed a check the user set (``--max-drop``) or relies on."""

    exit_code = EXIT_QUALITY_GATE


def first_line(error):
    """The first line of an exception's text (its type's name when it has none): the part of a
    library's long message that fits in a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def last_line(error):
    """The last line of an exception's text (its type's name when it has none): where torch and
    torchvision put the reason, after their context."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def _sentences(text, count):
    return ". ".join(text.split(". ")[:count]).rstrip(".")


def resource_error_message(error):
    """One line for what torch raises when a run asks more than the machine has or allows (None for
    any other error): memory on the GPU or the host, shared memory for loader workers (a
    container's 64 MB /dev/shm), an operation with no deterministic implementation on this device
    (--deterministic). The option that fixes it is in the line; a bug keeps its traceback."""
    causes = [error]
    while causes[-1].__cause__ is not None and len(causes) < 10:  # "exited unexpectedly" from "killed by signal: ..."
        causes.append(causes[-1].__cause__)
    worker_deaths = [first_line(e) for e in causes if first_line(e).startswith("DataLoader worker (pid ")]
    text = worker_deaths[0] if worker_deaths else first_line(error)
    # a loader worker's death as torch reports it where the worker is this process's child; any other death
    # (a segmentation fault, an exit code) is a bug and keeps its traceback
    if text.startswith("DataLoader worker") and ("Bus error" in text or "shared memory" in text):
        return (f"a DataLoader worker ran out of shared memory ({_sentences(text, 1)}); in a container give it more "
                f"(docker run --shm-size 8g, or --ipc=host), or pass fewer --workers (0 loads in the main process)")
    if text.startswith("DataLoader worker") and "signal: Killed" in text:
        return (f"{_sentences(text, 1)}: most often the kernel, for want of host memory; pass fewer --workers "
                f"(0 loads in the main process) or a smaller --batch-size")
    if "Too many open files" in text:  # shared-memory handles of many workers' batches
        return (f"out of file descriptors ({_sentences(text, 1)[:200]}); raise the limit (ulimit -n 65536) or pass "
                f"fewer --workers")
    if "does not have a deterministic implementation" in text:
        operation = text.split(" does not have", 1)[0]
        return (f"--deterministic: {operation} has no deterministic implementation on this device in this torch; "
                f"run without --deterministic (or with a backbone that avoids it)")
    if (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text):
        return (f"out of memory ({_sentences(text, 2)[:200]}); lower --batch-size (or --eval-batch-size) or "
                f"--image-size, or use --precision bf16 where the device has it")
    return None
