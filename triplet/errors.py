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
    text = first_line(error)
    if "shared memory" in str(error) or text.startswith("DataLoader worker"):
        # the worker's death as torch reports it: "(pid 7) is killed by signal: Bus error. It is possible that
        # dataloader's workers are out of shared memory" where the worker is our child, else "exited unexpectedly"
        return ("a DataLoader worker died: a bus error is a full /dev/shm (in a container give it more: docker "
                "run --shm-size 8g, or --ipc=host), a kill the host's memory; or pass fewer --workers "
                "(0 loads in the main process)")
    if "does not have a deterministic implementation" in text:
        operation = text.split(" does not have", 1)[0]
        return (f"--deterministic: {operation} has no deterministic implementation on this device in this torch; "
                f"run without --deterministic (or with a backbone that avoids it)")
    if (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text):
        return (f"out of memory ({_sentences(text, 2)[:200]}); lower --batch-size (or --eval-batch-size) or "
                f"--image-size, or use --precision bf16 where the device has it")
    return None
