"""What the demo run shows: its table (trained beside the model it started from) and one paragraph.

Both are built from ``RUN_DIR/metrics.json`` and ``metrics_untrained.json`` alone, so the README's
demo table and REPORT.md's paragraph are regenerated from the run and never pasted.
"""
import statistics
from pathlib import Path

from triplet.errors import UserError
from triplet.fileio import read_json

# (metrics key, label, decimals)
TABLE_ROWS = [("precision_at_1", "Test Precision@1, %", 1), ("precision_at_5", "Test Precision@5, %", 1),
              ("map_at_r", "Test MAP@R, %", 1), ("r_precision", "Test R-Precision, %", 1),
              ("triplet_accuracy", "Test triplet accuracy, %", 1),
              ("cos_sim_ap", "Cosine similarity anchor-positive", 3),
              ("cos_sim_an", "Cosine similarity anchor-negative", 3),
              ("cos_gap", "Gap (anchor-positive − anchor-negative)", 3)]
DEMO_PREFIX = "demo-"


def is_demo(run_name):
    return run_name.startswith(DEMO_PREFIX)


def with_gap(metrics):
    """The metrics plus ``cos_gap``: how much nearer a same-class image is than another class's."""
    return {**metrics, "cos_gap": metrics["cos_sim_ap"] - metrics["cos_sim_an"]}


def change(key, before, after, decimals):
    """The change column: points for percentages, a ratio too for MAP@R (the demo's claim)."""
    text = f"{after - before:+.{decimals}f}"
    if key == "map_at_r" and before > 0:
        text += f" (×{after / before:.1f})"
    return text


def demo_table(trained, untrained):
    """Markdown table: each metric untrained (epoch 0, the training's start), trained, change."""
    trained, untrained = with_gap(trained), with_gap(untrained)
    lines = [f"| Metric | Untrained (epoch 0) | Trained (epoch {trained.get('epoch', '?')}) | Change |",
             "|---|---|---|---|"]
    for key, label, decimals in TABLE_ROWS:
        before, after = untrained[key], trained[key]
        lines.append(f"| {label} | {before:.{decimals}f} | {after:.{decimals}f} | {change(key, before, after, decimals)} |")
    return "\n".join(lines)


def spread(values, decimals):
    """``mean ± sample standard deviation (min to max)`` of several seeds' values."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{decimals}f} ± {sd:.{decimals}f} ({min(values):.{decimals}f} to {max(values):.{decimals}f})"


def seeds_table(pairs, seeds=None):
    """Markdown table over several runs (seeds) given as (trained, untrained) metric pairs:
    each metric's mean ± standard deviation (min to max) untrained, trained, and of the change.
    ``seeds``: each run's training seed, where known; runs that share one are not "seeds"."""
    pairs = [(with_gap(t), with_gap(u)) for t, u in pairs]
    known = [s for s in seeds or [] if s is not None]
    runs = (f"{len(pairs)} runs, seeds {', '.join(map(str, seeds))}" if len(set(known)) < len(known)
            else f"{len(pairs)} seeds")
    lines = [f"| Metric ({runs}: mean ± sd (min to max)) | Untrained (epoch 0) | Trained | Change |",
             "|---|---|---|---|"]
    for key, label, decimals in TABLE_ROWS:
        before, after = [u[key] for _, u in pairs], [t[key] for t, _ in pairs]
        cells = [label, spread(before, decimals), spread(after, decimals),
                 spread([a - b for a, b in zip(after, before)], decimals)]
        if key == "map_at_r" and all(before):
            cells[-1] += f"; ratio {spread([a / b for a, b in zip(after, before)], 2)}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(trained, untrained):
    """The paragraph's claim, only as strong as the numbers: learning shown, or not."""
    closer = trained["cos_gap"] > untrained["cos_gap"]
    better = trained["precision_at_1"] > untrained["precision_at_1"] and trained["map_at_r"] > untrained["map_at_r"]
    if closer and better:
        return ("the triplet loss pulled same-class images together relative to other classes, and retrieval "
                "improved with it.")
    return ("here training did not both widen that gap and improve retrieval, so this run does not show the "
            "learning the demo is meant to show (docs/demo.md says what it shows across seeds).")


def demo_paragraph(trained, untrained):
    """One paragraph for REPORT.md: what the demo's numbers show, and what they do not."""
    t, u = with_gap(trained), with_gap(untrained)
    ratio = f"×{t['map_at_r'] / u['map_at_r']:.1f}" if u["map_at_r"] > 0 else "from zero"
    return (
        f"**What this shows.** Against the exact model training started from (same seed, same "
        f"architecture, same test images and preprocessing; only the training differs), training moved test "
        f"Precision@1 from {u['precision_at_1']:.1f}% to {t['precision_at_1']:.1f}% "
        f"({t['precision_at_1'] - u['precision_at_1']:+.1f} points) and MAP@R from {u['map_at_r']:.1f}% to "
        f"{t['map_at_r']:.1f}% ({ratio}); the anchor-positive cosine similarity went from {u['cos_sim_ap']:.3f} "
        f"to {t['cos_sim_ap']:.3f} and the anchor-negative one from {u['cos_sim_an']:.3f} to "
        f"{t['cos_sim_an']:.3f}, so the gap between them went from {u['cos_gap']:.3f} to {t['cos_gap']:.3f}: "
        f"{verdict(t, u)} **What it does not show.** The set is synthetic ({t.get('num_classes', '?')} classes "
        f"of drawn shapes on cluttered backgrounds, {t.get('num_images', '?')} test images of the same classes "
        f"as training): it says nothing about accuracy on CUB's bird photographs or on classes never seen in "
        f"training, and this is one seed (docs/demo.md gives the spread across seeds).")


def training_seed(run_dir):
    """The --seed a run folder was trained with (config.json), or None where it does not say."""
    try:
        options = read_json(Path(run_dir) / "config.json").get("options") or {}
    except (UserError, OSError, AttributeError):
        return None
    return options.get("seed") if isinstance(options, dict) else None


def read_demo_metrics(run_dir):
    """(trained, untrained) metrics of a demo run folder; a one-line error says what to run."""
    run_dir = Path(run_dir)
    paths = run_dir / "metrics.json", run_dir / "metrics_untrained.json"
    commands = (f"python scripts/evaluate.py --run {run_dir}",
                f"python scripts/evaluate.py --run {run_dir} --checkpoint none")
    for path, command in zip(paths, commands):
        if not path.is_file():
            raise UserError(f"{path}: not found; run `{command}` (or `make demo`) first")
    trained, untrained = (read_json(path) for path in paths)
    for path, metrics in zip(paths, (trained, untrained)):
        if not isinstance(metrics, dict):
            raise UserError(f"{path}: not a metrics object; re-run scripts/evaluate.py for it")
        missing = [key for key, _, _ in TABLE_ROWS if key != "cos_gap"
                   and not isinstance(metrics.get(key), (int, float))]
        if missing:
            raise UserError(f"{path}: lacks numeric {', '.join(missing)}; re-run scripts/evaluate.py for it")
    if untrained.get("checkpoint") != "none":
        raise UserError(f"{paths[1]}: not an untrained evaluation (checkpoint {untrained.get('checkpoint')!r}); "
                        f"run `{commands[1]}`")
    return trained, untrained
