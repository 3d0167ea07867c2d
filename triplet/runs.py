"""Run folders: config.json, history.csv, checkpoints, metrics.json, plots.

A run folder is never silently overwritten: ``claim_run_dir`` refuses a folder that holds a
run unless the user asked to resume it (same configuration) or to overwrite it (``--force``).
"""
import dataclasses
from pathlib import Path

from triplet.errors import UserError
from triplet.fileio import read_json, write_csv, write_json

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


def make_config(options, device, precision, world_size=1):
    from triplet.runtime import environment  # here: reports read run folders without torch

    roles = {f.name: f.metadata["role"] for f in dataclasses.fields(options) if "role" in f.metadata}
    return {"options": dataclasses.asdict(options), "option_roles": roles,
            "environment": environment(device, precision, world_size)}


def option_defaults(options):
    return {f.name: f.default for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING}


def _differences(old, new, roles):
    return [k for k in sorted(set(old) | set(new))
            if roles.get(k) not in RESUMABLE_ROLES and old.get(k) != new.get(k)]


def claim_run_dir(run_dir, config, resume=False, force=False, defaults=None):
    """Decide how training may use ``run_dir``; return the path of a checkpoint to resume or None.

    ``defaults``: the options' defaults, standing in for options an older run's config lacks.
    """
    run_dir = Path(run_dir)
    config_path, last = run_dir / "config.json", run_dir / "checkpoint_last.pt"
    if not config_path.exists() and not last.exists():
        return None
    if force:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        return None
    if not resume:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, --force to "
                        f"overwrite it, or choose another --out")
    if config_path.exists():
        # An option missing from an older run's config is one added since: that run had its default.
        old = {**(defaults or {}), **read_json(config_path).get("options", {})}
        changed = _differences(old, config["options"], config.get("option_roles", {}))
        if changed:
            detail = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {config['options'].get(k)!r}"
                               for k in changed[:3])
            raise UserError(f"{run_dir}: holds a run with a different configuration ({detail}); "
                            f"use another --out, or --force to overwrite it")
    return last if last.exists() else None


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


def find_runs(results_dir="results", log=print):
    """Every run folder under ``results_dir`` with a readable metrics.json, best test Precision@1 first."""
    runs = []
    for metrics_path in sorted(Path(results_dir).glob("*/metrics.json")):
        try:
            runs.append((metrics_path.parent, read_json(metrics_path)))
        except UserError as e:
            log(f"warning: skipping {metrics_path.parent}: {e}")
    return sorted(runs, key=lambda r: -r[1].get("precision_at_1", float("-inf")))
