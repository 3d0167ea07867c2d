"""Atomic file writes and careful reads: a crash never leaves a truncated file that a later stage
trusts, and a damaged or foreign file is named in a one-line error, never a traceback.

Everything the suite writes goes to a temporary name in the same folder and is renamed into
place (``os.replace`` is atomic on POSIX and Windows); a full disk is reported as such, with the
file it was writing, and leaves the previous version of that file intact.
"""
import contextlib
import csv
import errno
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

from triplet.errors import UserError

TEMPORARY_MARK = ".tmp"  # atomic_path's temporaries: ".<name>.<random>.tmp<suffix>"

# What np.load raises on a damaged .npz: a truncated zip is BadZipFile (not an OSError), a damaged
# member zlib.error or ValueError, a missing array KeyError.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class DiskFull(UserError):
    """Not the file's fault: callers that skip bad files (prepare_data --skip-bad) must stop on it."""


def disk_full_error(path, cause=""):
    detail = f" ({cause})" if cause else ""
    return DiskFull(f"{path}: disk full while writing it{detail}; the previous version of the file, if any, is "
                     f"intact; free some space and run the command again")


def is_disk_full(error):
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_MARK + path.suffix, dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path) from e
        if isinstance(e, OSError) and e.filename in (tmp, str(tmp)):
            raise _naming(e, path) from None
        raise


def _naming(error, path):
    """``error`` naming ``path``, the file the user asked for, not the temporary name beside it
    (which is gone); a failed mkdir keeps the folder it names."""
    if error.filename is None or TEMPORARY_MARK in os.path.basename(str(error.filename)):
        return type(error)(error.errno, error.strerror, str(path))
    return error


def remove_stale_temporaries(folder):
    """Delete what killed atomic writes left in ``folder``; call only while no one writes there."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_text(path):
    """A text file as UTF-8 (a BOM is dropped); other bytes are named by line, not a traceback."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UserError(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise UserError(f"{path}: is a folder, not a file") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                        f"UTF-8") from e


def read_json(path):
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def read_json_object(path, what="a JSON object"):
    """``read_json`` for files that must hold an object (``{...}``): ``[]`` or ``null`` is refused."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds {type(value).__name__} JSON, not {what}; restore or delete the file")
    return value


def write_csv(path, rows, fieldnames):
    """Write ``rows`` (dicts) as CSV with a header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path, required=()):
    """Rows of a CSV file as dicts; a missing ``required`` column is named with the file."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: has no column {', '.join(missing)} (its header: "
                        f"{','.join(reader.fieldnames or []) or 'empty'})")
    return list(reader)
