"""The run folders the report compares: what each was tested on, and what it may be compared with.

Runs are comparable only on the same images: each run's dataset (name and kind) comes from its
metrics.json or config.json (or, for runs older than those fields, from the prepared folder its
options point to); the study's numbers apply only to matching CUB runs (``study.matching_experiment``);
an untrained baseline only to runs tested on the same images at the same size.
"""
import math
from pathlib import Path

from triplet.data.prepare import prepared_dir, read_prepare_info, run_data_options
from triplet.data.sources import cub_kind
from triplet.errors import UserError
from triplet.reporting import study
from triplet.runs import NUMERIC_METRICS, find_runs, read_config, read_metrics


def run_dataset(metrics, config, options):
    """{"name", "kind"} of the images a run was tested on: from metrics.json, config.json, or (for
    runs older than those fields) the prepare.json or CUB folder its options point to."""
    if metrics.get("dataset_kind"):
        return {"name": metrics.get("dataset"), "kind": metrics["dataset_kind"]}
    if config.get("dataset", {}).get("kind"):
        return {"name": config["dataset"].get("name"), "kind": config["dataset"]["kind"]}
    try:
        data = run_data_options(options)
        recorded = read_prepare_info(prepared_dir(data))["dataset"]
        if recorded["kind"] != "unknown":
            return {"name": recorded["name"], "kind": recorded["kind"]}
        root = Path(data.data_dir) / "CUB_200_2011"
        if root.is_dir():
            kind = cub_kind(root)
            return {"name": "CUB-200-2011" if kind == "cub" else kind, "kind": kind}
    except (KeyError, TypeError, UserError):
        pass
    return {"name": "unknown", "kind": "unknown"}


def dataset_label(run):
    name, kind = run["dataset"]["name"], run["dataset"]["kind"]
    return name if name == kind else f"{name} ({kind})"


def is_stale(run_dir):
    """metrics.json older than checkpoint_last.pt: training went on (--resume) after evaluation."""
    last, metrics = run_dir / "checkpoint_last.pt", run_dir / "metrics.json"
    return last.exists() and metrics.stat().st_mtime_ns < last.stat().st_mtime_ns


def finite(metrics, path, log):
    """``metrics`` without NaN or ±Infinity (JSON allows them): such a value measures nothing, so it
    is shown and ranked as missing; a NaN Precision@1 would otherwise sort as the best run."""
    odd = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if odd:
        log(f"warning: {path}: {', '.join(f'{k} is {metrics[k]!r}' for k in odd)}, not a real number; "
            f"shown as missing; re-run scripts/evaluate.py")
    return {k: v for k, v in metrics.items() if k not in odd}


def load_runs(results_dir, log=print, numeric=NUMERIC_METRICS):
    """Every folder under ``results_dir`` with a metrics.json, as dicts; unreadable ones skipped.

    ``numeric``: the metrics.json keys that must hold numbers where present (``runs.read_metrics``)."""
    runs = []
    for run_dir, metrics in sorted(find_runs(results_dir, log, numeric), key=lambda r: r[0]):
        try:
            config = read_config(run_dir / "config.json") if (run_dir / "config.json").exists() else {}
            untrained = run_dir / "metrics_untrained.json"
            untrained = finite(read_metrics(untrained, numeric), untrained, log) if untrained.exists() else None
        except UserError as e:
            log(f"warning: skipping {run_dir}: {e}")
            continue
        metrics = finite(metrics, run_dir / "metrics.json", log)
        options = config.get("options", {})
        dataset = run_dataset(metrics, config, options)
        baseline = metrics.get("checkpoint") == "none"
        runs.append({"name": run_dir.name, "dir": run_dir, "metrics": metrics, "options": options,
                     "runtime_options": {k for k, role in config.get("option_roles", {}).items() if role == "runtime"},
                     "environment": config.get("environment", {}), "baseline": baseline, "untrained": untrained,
                     "dataset": dataset, "stale": not baseline and is_stale(run_dir),
                     "study": None if baseline else study.matching_experiment(run_dir.name, options, dataset["kind"])})
    return runs


def untrained_metrics(run, by_name):
    """The untrained trunk's metrics for ``run``: its own metrics_untrained.json, else those of a
    baseline-{backbone} folder tested on the same images at the same size (a demo run on synthetic
    data must not be compared with a CUB baseline)."""
    if run["untrained"]:
        return run["untrained"]
    m = run["metrics"]
    baseline = by_name.get(f"baseline-{m.get('backbone')}")
    if not baseline or baseline is run:
        return None
    same_test = baseline["dataset"] == run["dataset"] and \
        all(baseline["metrics"].get(k) == m.get(k) for k in ("split", "num_images", "num_classes", "image_size"))
    return baseline["metrics"] if same_test else None
