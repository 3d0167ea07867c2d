"""results/REPORT.md: every evaluated run beside the numbers the study published for it.

The report is rebuilt from the run folders alone (metrics.json, config.json, the figures), so it
can never drift from the results: summary tables ranked by test Precision@1, one per dataset
(runs on different images are not comparable), then one section per run with our retrieval
metrics, links to the figures and the exact commands that made the run. A run on CUB-200-2011
in a folder named ``exp{1-6}-{backbone}`` whose options are that experiment's is set beside the
study's published numbers (``triplet.reporting.study``); no other run is. A metrics.json older
than its run's last checkpoint (training went on after evaluation) is flagged as stale.
"""
import re
import shlex
from pathlib import Path
from urllib.parse import quote

from triplet.reporting import study
from triplet.reporting.collect import dataset_label, load_runs, untrained_metrics
from triplet.reporting.demo import demo_paragraph, is_demo
from triplet.errors import UserError
from triplet.fileio import write_text
from triplet.runs import describe_recipe, ranked_precision

# (metrics key, label, decimals); the first seven are the study's Tables I-XX.
ROWS = [("loss", "Loss", 4), ("triplet_accuracy", 'Triplet accuracy (study: "Top-1 Accuracy"), %', 2),
        ("cos_sim_ap", "Cosine similarity anchor-positive", 4), ("cos_sim_an", "Cosine similarity anchor-negative", 4),
        ("precision_at_1", "Precision@1, %", 2), ("precision_at_5", "Precision@5, %", 2),
        ("precision_at_10", "Precision@10, %", 2), ("recall_at_1", "Recall@1, %", 2), ("recall_at_2", "Recall@2, %", 2),
        ("recall_at_4", "Recall@4, %", 2), ("recall_at_8", "Recall@8, %", 2), ("map_at_r", "MAP@R, %", 2),
        ("r_precision", "R-Precision, %", 2), ("nmi", "NMI, %", 2)]
FIGURES = [("curves.png", "training curves"), ("tsne.png", "t-SNE map"), ("pca.png", "PCA map"),
           ("retrieval.png", "retrieval examples")]
BENCHMARKS = [("onnx_benchmark.md", "ONNX inference benchmark"), ("train_benchmark.md", "Training-step benchmark")]
DASH = "—"

NOTES = f"""\
Runs are grouped by the dataset they were tested on. A run on CUB-200-2011 whose folder and
options match one of the study's experiments (for example `make exp1`) is compared with the
numbers published in {study.SOURCE}. How to read the comparison:

- The study's "Top-1 Accuracy" is the **triplet accuracy**: the share of test triplets (anchor,
  positive, negative) whose positive lies nearer the anchor than the negative. It is not a
  classification accuracy. Ours is measured on one fixed, seeded triplet per test image.
- The study computed its Precision@1/5/10 with its own retrieval protocol, which it does not fully
  describe; ours ranks every other test image by cosine similarity, the query itself excluded.
  The study's test triplets are not published either, so **comparisons are indicative**, not exact.
- The loss depends on the margin: compare losses only between runs with the same margin.
- Recall@K, MAP@R, R-Precision (Musgrave et al., 2020) and NMI are ours; the study has none.
"""


def fmt(value, decimals):
    return DASH if value is None else f"{value:.{decimals}f}"


def natural_key(name):
    """``exp2`` before ``exp10``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def train_command(run_dir, options, runtime=()):
    """The ``scripts/train.py`` line that reproduces a run, rebuilt from its config.json.

    ``runtime``: options that decide where or how fast the run went, not its numbers (the
    "runtime" role config.json records): left out, so the command runs on the reader's machine.
    """
    args = []
    for key, value in options.items():
        if key in runtime or key == "out" or value is None or value is False:
            continue
        args.append(f"--{key.replace('_', '-')}")
        if value is not True:
            args.append(shlex.quote(str(value)))
    return " ".join(["python scripts/train.py", *args, "--out", shlex.quote(str(run_dir))])


def evaluate_command(run_dir, metrics, options):
    """The ``scripts/evaluate.py`` line that produced metrics.json."""
    args = ["python scripts/evaluate.py", "--run", shlex.quote(str(run_dir))]
    checkpoint = str(metrics.get("checkpoint", ""))
    if checkpoint == "none":
        args += ["--checkpoint", "none", "--backbone", metrics.get("backbone", options.get("backbone", "resnet18")),
                 "--weights", shlex.quote(str(options.get("weights", "imagenet")))]
        if options.get("data_dir"):
            args += ["--data-dir", shlex.quote(str(options["data_dir"]))]
        args += ["--split", str(metrics.get("split", "official")), "--image-size", str(metrics.get("image_size", 224))]
        if metrics.get("embedding_dim", 128) != 128:
            args += ["--embedding-dim", str(metrics["embedding_dim"])]
    elif checkpoint.endswith("checkpoint_last.pt"):
        args += ["--checkpoint", "last"]
    elif checkpoint and not checkpoint.endswith("checkpoint_best.pt"):
        args += ["--checkpoint", shlex.quote(checkpoint)]
    if metrics.get("seed", 0) != 0:
        args += ["--seed", str(metrics["seed"])]
    return " ".join(args)


def test_images(metrics):
    n = metrics.get("num_images", DASH)
    return f"{n} ({metrics['num_queries']} queries)" if metrics.get("protocol") == "query-gallery" else n


def ranking(runs):
    """One dataset's runs ranked by test Precision@1; the best trained run is marked (never one
    without a real Precision@1: none, null, NaN or infinite)."""
    ranked = sorted(runs, key=lambda r: -ranked_precision(r["metrics"]))
    trained = [r for r in ranked if not r["baseline"] and ranked_precision(r["metrics"]) > float("-inf")]
    best = trained[0] if trained else None
    lines = ["| Rank | Run | Dataset | Classes | Image size | Backbone | Epochs | LR | Batch | Mining | Test images | "
             "Test P@1 | P@5 | P@10 | MAP@R | Triplet acc. | Study P@1 |", "|" + "---|" * 17]
    for rank, run in enumerate(ranked, 1):
        m, o, key = run["metrics"], run["options"], run["study"]
        p1 = fmt(m.get("precision_at_1"), 2)
        mark = " **best**" if run is best else ""
        epochs = "0 (untrained)" if run["baseline"] else o.get("epochs", DASH)
        name = f"[{run['name']}](#{anchor(run['name'])})" + (" ⚠ stale" if run["stale"] else "")
        cells = [f"{rank}{mark}", name, dataset_label(run), m.get("num_classes", DASH), m.get("image_size", DASH),
                 m.get("backbone", DASH), epochs,
                 DASH if run["baseline"] else o.get("lr", DASH), DASH if run["baseline"] else o.get("batch_size", DASH),
                 DASH if run["baseline"] else o.get("mining", DASH), test_images(m),
                 f"**{p1}**" if mark else p1,
                 fmt(m.get("precision_at_5"), 2), fmt(m.get("precision_at_10"), 2), fmt(m.get("map_at_r"), 2),
                 fmt(m.get("triplet_accuracy"), 2), fmt(study.STUDY[key]["precision_at_1"], 2) if key else DASH]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(runs):
    """One ranking per dataset, CUB-200-2011 first: runs on different images are not comparable."""
    groups = {}
    for run in runs:
        groups.setdefault(dataset_label(run), []).append(run)
    parts = []
    for label in sorted(groups, key=lambda g: (groups[g][0]["dataset"]["kind"] != "cub", g)):
        parts += [f"### {label}", "", ranking(groups[label]), ""]
    return "\n".join(parts).rstrip()


def anchor(name):
    """GitHub's heading anchor for a ``## name`` heading."""
    return re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


def describe(run):
    m, o, env = run["metrics"], run["options"], run["environment"]
    if run["baseline"]:
        text = f"untrained {m.get('backbone', '?')} trunk (weights {o.get('weights', 'imagenet')}), no training"
    else:
        text = f"{describe_recipe(o)}; checkpoint of epoch {m.get('epoch', '?')}"
    protocol = m.get("protocol", "leave-one-out")
    if protocol == "query-gallery":
        protocol += f": {m.get('num_queries', '?')} queries against {m.get('num_gallery', '?')} gallery images"
    text += (f"; embedding {m.get('embedding_dim', '?')}-d, image size {m.get('image_size', '?')}; tested on "
             f"{m.get('num_images', '?')} images of {m.get('num_classes', '?')} classes of {dataset_label(run)} "
             f"({m.get('split', '?')} split, {protocol} retrieval).")
    if env:
        commit = (env.get("git_commit") or "unknown")[:10]
        text += (f" Ran on {env.get('device', '?')} ({env.get('precision', '?')}, world size "
                 f"{env.get('world_size', 1)}), torch {env.get('torch', '?')}, commit {commit}.")
    return text


def run_section(run, by_name):
    m, key = run["metrics"], run["study"]
    published = study.STUDY.get(key, {})
    untrained = untrained_metrics(run, by_name)
    lines = [f"## {run['name']}", ""]
    if run["stale"]:
        lines += [f"**Stale:** metrics.json is older than checkpoint_last.pt (training went on after the "
                  f"evaluation, e.g. with --resume); re-run `python scripts/evaluate.py --run "
                  f"{shlex.quote(str(run['dir']))}`.", ""]
    named = study.study_key(run["name"])
    if named and not key and not run["baseline"]:
        lines += [f"Named after the study's experiment {named[0][3:]}, but not comparable with it: the study ran on "
                  f"CUB-200-2011 with {', '.join(f'{k} {v}' for k, v in {**study.EXPERIMENTS[named[0]], **study.PROTOCOL}.items())}"
                  f" (this run: {dataset_label(run)}); so no study columns.", ""]
    if key:
        hp = study.EXPERIMENTS[key[0]]
        lines += [f"Study: experiment {key[0][3:]} with {key[1].replace('resnet', 'ResNet')} (Tables "
                  f"{published['tables']}): {hp['epochs']} epochs, lr {hp['lr']}, batch {hp['batch_size']}.", ""]
    lines += [f"This run: {describe(run)}", ""]
    if is_demo(run["name"]) and run["untrained"] and not run["baseline"]:
        lines += [demo_paragraph(m, run["untrained"]), ""]
    header = ["Metric", "This run"] + (["Study", "Δ (run − study)"] if key else []) + \
        (["Untrained trunk"] if untrained else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label, decimals in ROWS:
        ours, theirs = m.get(name), published.get(name)
        delta = DASH if ours is None or theirs is None else f"{ours - theirs:+.{decimals}f}"
        cells = [label, fmt(ours, decimals)] + ([fmt(theirs, decimals), delta] if key else [])
        if untrained:
            cells.append(fmt(untrained.get(name), decimals))
        lines.append("| " + " | ".join(cells) + " |")
    run_dir = run["dir"]  # results_dir/name, spelled as the user gave results_dir
    figures = [f"[{label}]({quote(run['name'] + '/' + file)})" for file, label in FIGURES if (run_dir / file).exists()]
    plot = f"python scripts/plot_embeddings.py --run {shlex.quote(str(run_dir))}"
    lines += ["", "Figures: " + (" · ".join(figures) if figures else f"none yet (`{plot}`)")]
    commands = [] if run["baseline"] or not run["options"] else [train_command(run_dir, run["options"], run["runtime_options"])]
    commands.append(evaluate_command(run_dir, m, run["options"]))
    if (run_dir / "tsne.png").exists() or (run_dir / "pca.png").exists():
        commands.append(plot)
    lines += ["", "Commands:", "", "```bash", *commands, "```"]
    return "\n".join(lines)


def include(path):
    """A benchmark's markdown, its headings pushed two levels down so they nest under ours."""
    lines, fenced = [], False
    for line in Path(path).read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        lines.append("##" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines).strip()


def build_report(results_dir, log=print):
    """The text of REPORT.md for every evaluated run under ``results_dir``."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"--results {results_dir}: folder not found")
    numeric = [key for key, _, _ in ROWS] + ["epoch", "num_images", "num_classes", "embedding_dim", "image_size"]
    runs = load_runs(results_dir, log, numeric)
    unevaluated = sorted(path.name for path in results_dir.iterdir()
                         if (path / "config.json").is_file() and not (path / "metrics.json").exists())
    if unevaluated:  # trained (or training) but never evaluated: say so rather than leave them out unseen
        log(f"note: {len(unevaluated)} run folder(s) left out, not evaluated yet (no metrics.json): "
            f"{', '.join(unevaluated)}; python scripts/evaluate.py --run {results_dir / unevaluated[0]}")
    if not runs:
        raise UserError(f"--results {results_dir}: no evaluated runs (no */metrics.json); run "
                        f"python scripts/evaluate.py --run RUN_DIR first")
    by_name = {run["name"]: run for run in runs}
    parts = ["# Results", "", NOTES, "## Summary", "",
             "All runs, by dataset, best test Precision@1 first (the best trained run of each dataset is "
             "marked; an untrained trunk shows what training adds).", "", summary(runs)]
    for run in sorted(runs, key=lambda r: (r["baseline"], natural_key(r["name"]))):
        parts += ["", run_section(run, by_name)]
    for file, title in BENCHMARKS:
        if (results_dir / file).exists():
            parts += ["", f"## {title}", "", f"From [{file}]({file}).", "", include(results_dir / file)]
    return "\n".join(parts) + "\n", len(runs)


def write_report(results_dir, log=print):
    text, count = build_report(results_dir, log)
    path = Path(results_dir) / "REPORT.md"
    write_text(path, text)
    return path, count
