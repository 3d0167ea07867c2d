"""Shared command-line plumbing: dataclass options with documented defaults, one-line errors.

Every script is ``run(main, Options, __doc__)``: options are parsed from a dataclass with
argparse-dataclass, a ``UserError`` (or a bad option caught in ``__post_init__``) prints one
line naming the problem and exits with its status (``triplet.errors``: 2 for usage and input
errors, 3 for a refused quality gate), Ctrl-C exits 130, and ``--debug`` shows the full
traceback, the original cause included, instead.
"""
import argparse
import dataclasses
import errno
import os
import signal
import sys

from argparse_dataclass import ArgumentParser

from triplet.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError, last_line, resource_error_message

# What a shell reports for a program killed by SIGPIPE (128 + 13): `set -o pipefail` still sees that
# the output was cut short, as it would for a training run whose `tee` died.
EXIT_BROKEN_PIPE = 141

# What a user's own file system can refuse, and what to do about it. Other OSErrors are bugs and
# keep their traceback.
PATH_ADVICE = {
    errno.EACCES: "check its permissions (on Windows: that no other program has it open), or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EEXIST: "a file stands where a folder is needed: choose another path",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
    errno.EISDIR: "that is a folder: give a file name",
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is full: free some space and run the command again",
}


def one_line(error):
    """A UserError's message; raised in a DataLoader worker, it arrives wrapped in the worker's
    traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."), whose last line
    is ``module.X: message``."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = last_line(error)
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def path_error_message(error):
    """One line for an OSError the user's file system raised (None for any other)."""
    advice = PATH_ADVICE.get(getattr(error, "errno", None))
    if advice is None or not getattr(error, "filename", None):
        return None
    return f"{error.filename}: {error.strerror}; {advice}"


def build_parser(options_class, description=None):
    """argparse from the dataclass; a field's metadata may say ``required=True`` (shown as such in
    usage, while ``Options()`` still builds with its placeholder default for tests and library use)."""
    parser = ArgumentParser(options_class, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    for action in parser._actions:
        f = fields.get(action.dest)
        if f is None:
            continue
        if f.metadata.get("required"):
            action.required = True
        elif action.help and f.default not in (dataclasses.MISSING, "") and not isinstance(f.default, bool):
            action.help += f" (default: {f.default})"
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")

    def one_line_error(message):  # argparse's own prints its whole usage block first
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message} (--help lists the options)\n")

    parser.error = one_line_error
    return parser


def options_with_role(options_class, role):
    """Names of the options whose field metadata says ``role`` (for example "runtime": options
    that decide where or how fast a run goes, never its numbers)."""
    return {f.name for f in dataclasses.fields(options_class) if f.metadata.get("role") == role}


def parse(options_class, argv=None, description=None):
    """Return ``(options, debug)``; validation errors in ``__post_init__`` become UserError."""
    parser = build_parser(options_class, description)
    # The base class's parser: argparse-dataclass's own would build Options without --debug.
    namespace, extras = argparse.ArgumentParser.parse_known_args(parser, argv)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    kwargs = {k: v for k, v in vars(namespace).items() if v is not dataclasses.MISSING}
    debug = kwargs.pop("debug")
    try:
        return options_class(**kwargs), debug
    except ValueError as e:
        raise UserError(str(e)) from e


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(main, options_class, description=None, argv=None):
    """Parse options, call ``main(options)``, and turn user-caused failures into one line."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("TRIPLET_DEBUG") == "1"
    prog = os.path.basename(sys.argv[0])
    try:
        options, debug = parse(options_class, argv, description)
        result = main(options)
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `search.py ... | head`: the reader stopped reading; no traceback for that
        if debug:
            raise
        try:  # stdout to /dev/null, so flushing it at exit raises no second error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as e:  # an unwritable or full folder, a file in the way: one line, not a traceback
        message = None if debug else path_error_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (RuntimeError, MemoryError) as e:  # out of memory and the like: one line; any other is a bug
        message = None if debug else resource_error_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(result or 0)


def check(condition, message):
    """Raise ValueError (reported as a one-line option error) unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def plural(count, noun, plural_noun=None):
    """``1 run``, ``2 runs``: counts in messages read as English."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"
