"""Run folders: config.json, history.csv, checkpoints, metrics.json, plots.

A run folder is never silently overwritten or shared: ``lock_run_dir`` gives one process at a
time the folder (an OS lock that dies with its holder), ``claim_run_dir`` refuses a folder that
holds a run unless the user asked to resume it (same configuration) or to replace it
(``--force``), and ``set_aside_old_run`` moves a replaced run into a subfolder only when the new
run is about to write, so a mistake found before that loses nothing.
"""
import dataclasses
import math
import os
import time
from pathlib import Path

from triplet.errors import UserError
from triplet.fileio import read_json_object, remove_stale_temporaries, write_csv, write_json

try:
    import fcntl
except ImportError:  # Windows: no flock; msvcrt's byte-range locks instead
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

# Option roles (a field's ``metadata["role"]``): "runtime" options decide where or how fast a run
# goes, never its numbers; "extendable" ones may grow on --resume (more epochs). Both may differ
# between a run and its resumption; the report's commands leave out the runtime ones.
RESUMABLE_ROLES = ("runtime", "extendable")


@dataclasses.dataclass
class HistoryRow:
    """One epoch of history.csv; its fields are the CSV header. Epoch 0 is the untrained model."""
    epoch: int
    train_loss: float
    active_triplets: float
    val_loss: float
    val_triplet_accuracy: float
    val_precision_at_1: float
    lr: float
    seconds: float


HISTORY_FIELDS = [f.name for f in dataclasses.fields(HistoryRow)]
RUN_FILES = ["config.json", "history.csv", "checkpoint_last.pt", "checkpoint_best.pt", "metrics.json",
             "metrics_untrained.json", "test_embeddings.npz", "test_embeddings_untrained.npz", "curves.png",
             "tsne.png", "pca.png", "retrieval.png"]
LOCK_FILE = ".lock"
# Windows locks a byte range, and a locked byte cannot be read by anyone else: lock one far past
# the PID the file holds, so a second process can still read who holds the folder.
WINDOWS_LOCK_OFFSET = 2**30
NUMERIC_METRICS = ("precision_at_1", "epoch", "num_images", "num_classes")  # what ranking and reports rely on


def make_config(options, device, precision, world_size=1, precision_reason=None):
    from triplet.runtime import environment  # here: reports read run folders without torch

    roles = {f.name: f.metadata["role"] for f in dataclasses.fields(options) if "role" in f.metadata}
    return {"options": dataclasses.asdict(options), "option_roles": roles,
            "environment": environment(device, precision, world_size, precision_reason)}


def option_defaults(options):
    return {f.name: f.default for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING}


def read_config(path):
    """A run's config.json, checked: an object whose ``options`` is an object."""
    config = read_json_object(path, "a run config")
    if not isinstance(config.get("options"), dict) or not isinstance(config.get("environment", {}), dict):
        raise UserError(f"{path}: has no 'options' object; not a config.json written by scripts/train.py "
                        f"(restore it, or delete it and evaluate from the checkpoint)")
    return config


def require_options(options, keys, source):
    """``options`` unchanged when it has every key in ``keys``; else a one-line error naming ``source``."""
    missing = [k for k in keys if k not in options]
    if missing:
        raise UserError(f"{source}: its options lack {', '.join(missing)}; not written by scripts/train.py")
    return options


def read_metrics(path, numeric=NUMERIC_METRICS):
    """A metrics.json, checked: an object whose ``numeric`` values, where present, are numbers."""
    metrics = read_json_object(path, "metrics")
    odd = [k for k in numeric if metrics.get(k) is not None
           and (isinstance(metrics[k], bool) or not isinstance(metrics[k], (int, float)))]
    if odd:
        raise UserError(f"{path}: {odd[0]} is {metrics[odd[0]]!r}, not a number; re-run scripts/evaluate.py")
    return metrics


def _lock(handle):
    """An exclusive lock on ``handle``'s file that fails at once when another process holds it."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif msvcrt is not None:
        os.lseek(handle.fileno(), WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)


def lock_run_dir(run_dir):
    """Hold ``run_dir`` for this process until it exits; return the open lock file (keep it).

    The lock (``flock``; on Windows ``msvcrt.locking``) dies with the process, so a killed run
    never leaves a stale lock; the file holds the holder's PID for the error a second process gets.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot use it as a run folder ({e.strerror}); choose another --out") from e
    try:
        _lock(handle)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{run_dir}: in use by another training process (PID {holder}); wait for it to "
                        f"finish, stop it, or choose another --out") from e
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _same(key, old, new):
    if key == "data_dir" and isinstance(old, str) and isinstance(new, str):
        return os.path.normpath(old) == os.path.normpath(new) or Path(old).resolve() == Path(new).resolve()
    both_nan = isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new)
    return old == new or both_nan


def recipe_differences(old, new, roles):
    """The options, by name, that make two runs different runs (runtime and extendable ones aside)."""
    return [k for k in sorted(set(old) | set(new))
            if roles.get(k) not in RESUMABLE_ROLES and not _same(k, old.get(k), new.get(k))]


def describe_differences(old, new, names, most=3):
    """``--lr 0.001 -> 0.002, --batch-size 32 -> 64``: the first ``most`` of ``names``, for an error."""
    return ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {new.get(k)!r}" for k in names[:most])


def _recorded_options(run_dir):
    """The options that made the run in ``run_dir``: its last checkpoint's own (what a resume
    continues), else config.json's."""
    last, config_path = run_dir / "checkpoint_last.pt", run_dir / "config.json"
    if last.exists():
        from triplet.checkpoint import checkpoint_options, load_checkpoint  # torch, only to resume

        try:
            return checkpoint_options(load_checkpoint(last), last)
        except UserError as e:
            if not config_path.exists():
                raise UserError(f"{e}; cannot tell which options made this run: use another --out, or "
                                f"--force to replace it") from e
    try:
        return read_config(config_path)["options"]
    except UserError as e:
        raise UserError(f"{e}; cannot tell which options made this run: use another --out, or --force to "
                        f"replace it") from e


def claim_run_dir(run_dir, config, resume=False, force=False, defaults=None, log=print):
    """Decide how training may use ``run_dir``; return the path of a checkpoint to resume or None.

    Call it holding the folder's lock: it removes what killed writes left behind.
    ``defaults``: the options' defaults, standing in for options an older run's config lacks.
    """
    run_dir = Path(run_dir)
    removed = remove_stale_temporaries(run_dir) if run_dir.is_dir() else []
    if removed:
        log(f"{run_dir}: removed {len(removed)} temporary file(s) left by an interrupted write ({', '.join(removed)})")
    config_path, last = run_dir / "config.json", run_dir / "checkpoint_last.pt"
    if not config_path.exists() and not last.exists():
        return None
    if force:
        return None  # set_aside_old_run moves it once the new run is about to write
    if not resume:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, --force to "
                        f"replace it, or choose another --out")
    # An option missing from an older run's config is one added since: that run had its default.
    old = {**(defaults or {}), **_recorded_options(run_dir)}
    changed = recipe_differences(old, config["options"], config.get("option_roles", {}))
    if changed:
        raise UserError(f"{run_dir}: holds a run with a different configuration "
                        f"({describe_differences(old, config['options'], changed)}); "
                        f"use another --out, or --force to replace it")
    epochs = (old.get("epochs"), config["options"].get("epochs"))
    if old.get("scheduler") == "cosine" and epochs[0] != epochs[1] and last.exists():
        # the cosine lr of every epoch depends on --epochs: a longer run would have had other rates already
        raise UserError(f"{run_dir}: --epochs {epochs[0]} -> {epochs[1]} under --scheduler cosine would not be the "
                        f"run its config records (each epoch's lr depends on --epochs); train {epochs[1]} epochs "
                        f"in another --out, or resume with --epochs {epochs[0]}")
    return last if last.exists() else None


def set_aside_old_run(run_dir, log=print):
    """Move the files of the run in ``run_dir`` to ``run_dir/replaced-<time>/``; return that folder or None."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir / f"replaced-{stamp}", 1
    while aside.exists():
        n += 1
        aside = run_dir / f"replaced-{stamp}-{n}"
    aside.mkdir()
    for name in present:
        os.replace(run_dir / name, aside / name)
    log(f"--force: moved the previous run ({', '.join(present)}) to {aside}; delete it when you no longer need it")
    return aside


def describe_recipe(options):
    """``resnet18 (weights imagenet), 20 epochs, lr 0.001, batch 32, margin 1.0`` (+ mining, schedule):
    how a run was trained, in one line, for figure titles and the report."""
    parts = [f"{options.get('backbone', '?')} (weights {options.get('weights', '?')})",
             f"{options.get('epochs', '?')} epoch{'' if options.get('epochs') == 1 else 's'}",
             f"lr {options.get('lr', '?')}", f"batch {options.get('batch_size', '?')}",
             f"margin {options.get('margin', '?')}"]
    if options.get("mining", "none") != "none":
        parts.append(f"{options['mining']} mining ({options.get('samples_per_class')} per class)")
    if options.get("scheduler", "none") != "none":
        parts.append(f"{options['scheduler']} lr")
    return ", ".join(str(p) for p in parts)


def write_history(run_dir, history):
    write_csv(Path(run_dir) / "history.csv", history, HISTORY_FIELDS)


def write_config(run_dir, config):
    write_json(Path(run_dir) / "config.json", config)


def require_run_dir(run_dir, needs="checkpoint_best.pt"):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: run folder not found; train one with scripts/train.py --out {run_dir}")
    if needs and not (run_dir / needs).exists():
        raise UserError(f"--run {run_dir}: has no {needs}; finish training (scripts/train.py --resume "
                        f"--out {run_dir}) or evaluate it first")
    return run_dir


def find_runs(results_dir="results", log=print, numeric=NUMERIC_METRICS):
    """Every run folder under ``results_dir`` with a readable metrics.json, best test Precision@1 first."""
    runs = []
    for metrics_path in sorted(Path(results_dir).glob("*/metrics.json")):
        try:
            runs.append((metrics_path.parent, read_metrics(metrics_path, numeric)))
        except UserError as e:
            log(f"warning: skipping {metrics_path.parent}: {e}")
    return sorted(runs, key=lambda r: -ranked_precision(r[1]))


def ranked_precision(metrics):
    """Test Precision@1 for ranking runs; a missing, null, NaN or infinite one ranks last (an
    evaluation that diverged writes NaN, and json allows it)."""
    value = metrics.get("precision_at_1")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else float("-inf")
