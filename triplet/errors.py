"""Failures a user can cause and fix, and the exit status each kind ends a script with.

| status | meaning |
| --- | --- |
| 0 | done |
| 1 | a bug: an unexpected exception (its traceback is printed) |
| 2 | a usage or input error: a bad option, a missing or damaged file (``UserError``) |
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
