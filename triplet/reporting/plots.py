"""Figures of a run: a 2-D map of the test embeddings, a retrieval grid and the training curves.

Everything is drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI backend)
and written atomically at a modest DPI, so the PNGs stay small enough to embed in a README.
With 200 CUB classes a map coloured by every class is unreadable, so a seeded subset of classes
(at most 20, one distinct colour each, named in the legend) is drawn over the rest in faint grey.
"""
import io
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from triplet.deploy.neighbours import normalise, top_k
from triplet.errors import UserError
from triplet.fileio import NPZ_ERRORS, atomic_path, read_csv
from triplet.machine import usable_cores
from triplet.runs import describe_recipe, read_config, read_metrics, require_run_dir

DPI = 100
SAME, OTHER = "#1a9850", "#d73027"  # frame colours: neighbour of the query's class / of another
MAX_HIGHLIGHT = 20


def load_embeddings(run_dir):
    """``(embeddings, labels, paths)`` from RUN_DIR/test_embeddings.npz, which evaluate.py writes."""
    path = Path(run_dir) / "test_embeddings.npz"
    if not path.exists():
        raise UserError(f"--run {run_dir}: has no test_embeddings.npz; run "
                        f"python scripts/evaluate.py --run {run_dir} first")
    try:
        with np.load(path) as data:
            embeddings, labels = data["embeddings"].astype(np.float32), data["labels"]
            paths = data["paths"].astype(str) if "paths" in data else np.array([""] * len(labels))
    except NPZ_ERRORS as e:
        raise UserError(f"{path}: unreadable ({e}); re-run python scripts/evaluate.py --run {run_dir}") from e
    if len(labels) < 2:
        raise UserError(f"{path}: holds {len(labels)} embedding(s); need at least 2 to plot")
    bad = int((~np.isfinite(embeddings).all(axis=1)).sum()) if embeddings.ndim == 2 else len(labels)
    if bad:
        raise UserError(f"{path}: {bad} of {len(labels)} embeddings are not finite (NaN or infinite): a model that "
                        f"diverged gives them (train again with a lower --lr); if the file was edited, re-run "
                        f"python scripts/evaluate.py --run {run_dir}")
    return embeddings, labels, paths


def class_names(labels, paths):
    """Label -> readable name from the image's class folder ("001.Black_footed_Albatross")."""
    names = {}
    for label, path in zip(labels.tolist(), paths):
        folder = Path(path).parent.name
        names.setdefault(label, re.sub(r"^\d+\.", "", folder).replace("_", " ") or f"class {label}")
    return names


def projection_threads(points):
    """OpenMP/BLAS threads for a projection of ``points``: one per thousand points, at most the
    usable cores. A small map on all cores spends its time in thread start-up and, on a busy
    machine, in oversubscription; a large one still gets every core."""
    return max(1, min(usable_cores(), points // 1000))


def project(embeddings, method="tsne", seed=0):
    """2-D coordinates of the L2-normalised embeddings (Euclidean there is monotone in cosine)."""
    from sklearn.decomposition import PCA  # imported here: only the plots need scikit-learn
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = normalise(embeddings)
    with threadpool_limits(limits=projection_threads(len(x))):
        if method == "pca":
            return PCA(n_components=2, random_state=seed).fit_transform(x)
        if x.shape[1] > 50 and len(x) > 50:  # the usual PCA-50 first: same map, much faster
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                    random_state=seed, n_jobs=projection_threads(len(x))).fit_transform(x)


def _save(fig, path, colours=None):
    """Write ``fig`` as PNG; ``colours`` (e.g. 256) quantises photo grids to about a third the size."""
    with atomic_path(path) as tmp:
        if colours:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
            image = Image.open(buffer).convert("RGB")
            palette = image.quantize(colours)  # then dithered onto that palette: no banding
            image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(tmp, format="png", optimize=True)
        else:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return Path(path)


def plot_projection(xy, labels, names, path, title, highlight=12, seed=0, method="tsne"):
    """Scatter of ``xy``: ``highlight`` seeded classes in colour with a legend, the rest grey."""
    classes = np.unique(labels)
    highlight = min(highlight, MAX_HIGHLIGHT, len(classes))
    shown = np.sort(np.random.default_rng(seed).choice(classes, highlight, replace=False))
    fig = Figure(figsize=(9.5, 6.5))
    ax = fig.subplots()
    rest = ~np.isin(labels, shown)
    if rest.any():
        ax.scatter(xy[rest, 0], xy[rest, 1], s=5, c="#bdbdbd", alpha=0.45, linewidths=0,
                   label=f"{len(classes) - highlight} other classes", rasterized=True)
    colours = matplotlib.colormaps["tab20"].colors  # dark hues first, then their light twins
    palette = matplotlib.colormaps["tab10"].colors if highlight <= 10 else colours[0::2] + colours[1::2]
    for i, label in enumerate(shown):
        sel = labels == label
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, color=palette[i], edgecolors="white", linewidths=0.4,
                   label=f"{names.get(label.item(), label)} ({sel.sum()})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=1.4,
              title=f"{highlight} of {len(classes)} classes", title_fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    axis = "t-SNE" if method == "tsne" else "PC"
    ax.set_xlabel(f"{axis} 1"), ax.set_ylabel(f"{axis} 2")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _thumbnail(path, size):
    """A square RGB thumbnail, or None when the image is gone (the prepared copy was moved)."""
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size)))
    except (OSError, ValueError):
        return None


def choose_queries(labels, count, seed=0):
    """One seeded image from each of ``count`` seeded classes that have another member to find."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= 2] if (counts >= 2).any() else classes
    picked = rng.choice(eligible, min(count, len(eligible)), replace=False)
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in picked])


def plot_retrieval(embeddings, labels, paths, names, path, title, queries=6, k=5, seed=0, size=128):
    """Each row: a query, then its top-k neighbours framed green (same class) or red (other)."""
    k = min(k, len(labels) - 1)
    q = choose_queries(labels, queries, seed)
    x = normalise(embeddings)
    order, sims = top_k(x[q], x, k, exclude=q)
    fig = Figure(figsize=(1.75 * (k + 1), 1.95 * len(q)))
    axes = fig.subplots(len(q), k + 1, squeeze=False)
    missing = 0
    for row, query in enumerate(q):
        cells = [(query, None)] + list(zip(order[row], sims[row]))
        for col, (index, sim) in enumerate(cells):
            ax = axes[row, col]
            image = _thumbnail(paths[index], size)
            if image is None:
                missing += 1
                image = np.full((size, size, 3), 230, np.uint8)
                ax.text(size / 2, size / 2, "image\nnot found", ha="center", va="center", fontsize=7, color="#555")
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if sim is None:
                colour, ax_title = "#333333", "query"
                ax.set_ylabel(_wrap(names.get(labels[query].item(), "")), fontsize=7.5)
            else:
                same = labels[index] == labels[query]
                colour, ax_title = (SAME if same else OTHER), f"{sim:.3f}"
                if not same:
                    ax.set_xlabel(_wrap(names.get(labels[index].item(), "")), fontsize=6.5, color=OTHER)
            ax.set_title(ax_title, fontsize=8.5, color=colour, fontweight="bold" if sim is None else None)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour), spine.set_linewidth(3.5 if sim is not None else 1.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, colours=256), missing


def _wrap(text, width=18, max_lines=2):
    """A class name on at most two short lines, cut with an ellipsis, to fit under a thumbnail."""
    lines = [""]
    for word in text.split():
        lines[-1:] = [f"{lines[-1]} {word}".strip()] if len(lines[-1]) + len(word) < width else [lines[-1], word]
    return "\n".join(lines[:max_lines]) + ("…" if len(lines) > max_lines else "")


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_curves(rows, path, title):
    """Loss (train, val), val triplet accuracy and val Precision@1 per epoch, from history.csv."""
    epochs = [int(_float(r["epoch"])) for r in rows]
    col = {key: [_float(r.get(key)) for r in rows] for key in
           ("train_loss", "val_loss", "val_triplet_accuracy", "val_precision_at_1")}
    style = {"marker": "o", "markersize": 3.5} if len(rows) <= 40 else {}
    fig = Figure(figsize=(13, 3.8))
    ax_loss, ax_acc, ax_p1 = fig.subplots(1, 3)
    ax_loss.plot(epochs, col["train_loss"], label="train", **style)
    ax_loss.plot(epochs, col["val_loss"], label="validation", **style)
    ax_loss.set_title("triplet loss"), ax_loss.legend(frameon=False)
    ax_acc.plot(epochs, col["val_triplet_accuracy"], color="C2", **style)
    ax_acc.set_title("validation triplet accuracy (%)")
    p1 = np.array(col["val_precision_at_1"])
    ax_p1.plot(epochs, p1, color="C3", **style)
    ax_p1.set_title("validation Precision@1 (%)")
    trained = np.where(np.array(epochs) > 0, p1, np.nan)  # epoch 0 is the untrained reference
    if np.isfinite(trained).any():  # the epoch checkpoint_best.pt holds: the first maximum
        best = int(np.nanargmax(trained))
        ax_p1.plot(epochs[best], p1[best], "*", color="black", markersize=12, zorder=3,
                   label=f"best {p1[best]:.2f} (epoch {epochs[best]})")
        ax_p1.legend(frameon=False, loc="best")
    for ax in (ax_loss, ax_acc, ax_p1):
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir, method="tsne", max_points=0, seed=0, highlight=12, queries=6, log=print):
    """Write RUN_DIR/{tsne|pca}.png, retrieval.png and (when there is a history) curves.png."""
    run_dir = Path(run_dir)
    require_run_dir(run_dir, needs=None)
    embeddings, labels, paths = load_embeddings(run_dir)
    name, names = run_dir.resolve().name, class_names(labels, paths)
    config = read_config(run_dir / "config.json") if (run_dir / "config.json").exists() else {}
    metrics = read_metrics(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    p1 = metrics.get("precision_at_1")  # null, NaN or Infinity: no Precision@1 in the titles
    p1 = f", test P@1 {p1:.1f}%" if p1 is not None and math.isfinite(p1) else ""
    keep = np.arange(len(labels))
    if max_points and len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_points, replace=False))
    log(f"{method} of {len(keep)} test embeddings ({len(np.unique(labels))} classes)")
    xy = project(embeddings[keep], method, seed)
    title = f"{name}: {'t-SNE' if method == 'tsne' else 'PCA'} of {len(keep)} test embeddings{p1}"
    written = [plot_projection(xy, labels[keep], names, run_dir / f"{method}.png", title, highlight, seed, method)]
    title = f"{name}: top-5 test neighbours by cosine similarity (green: same class, red: another){p1}"
    retrieval, missing = plot_retrieval(embeddings, labels, paths, names, run_dir / "retrieval.png", title,
                                        queries, 5, seed)
    written.append(retrieval)
    if missing:
        log(f"warning: {missing} images in retrieval.png not found (prepared data moved?); drawn as placeholders")
    history = run_dir / "history.csv"
    try:
        rows = read_csv(history, ("epoch", "train_loss")) if history.exists() else []
    except UserError as e:  # a damaged history would draw empty axes over a good curves.png
        raise UserError(f"{e}; resuming the run (train.py with its options and --resume) rewrites it from "
                        f"checkpoint_last.pt; deleting it skips curves.png") from e
    if rows:
        written.append(plot_curves(rows, run_dir / "curves.png", f"{name}: {describe_recipe(config['options'])}" if config.get("options") else name))
    else:
        log(f"{run_dir} has no training history (an untrained baseline?); skipping curves.png")
    return written
