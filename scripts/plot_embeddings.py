"""Draw a run's figures: a t-SNE (or PCA) map of the test embeddings, a retrieval grid, the curves.

    python scripts/plot_embeddings.py --run results/exp1-resnet18
    python scripts/plot_embeddings.py --run results/exp1-resnet18 --method pca            # seconds, not a minute
    python scripts/plot_embeddings.py --run results/exp1-resnet18 --max-points 2000 --seed 1

Reads RUN_DIR/test_embeddings.npz (written by scripts/evaluate.py) and, when present, history.csv;
writes RUN_DIR/tsne.png (or pca.png), retrieval.png and curves.png (skipped for an untrained
baseline, which has no history).
"""
from dataclasses import dataclass, field

from triplet.cli import check, run
from triplet.reporting.plots import MAX_HIGHLIGHT, plot_run


@dataclass
class Options:
    run: str = field(default="", metadata={"required": True, "help": "run folder (RUN_DIR) holding test_embeddings.npz"})
    method: str = field(default="tsne", metadata={"choices": ["tsne", "pca"], "help": "2-D projection of the map"})
    max_points: int = field(default=0, metadata={
        "help": "project a seeded random subset of at most this many points (0: all; CUB's 5794 take about a minute)"})
    highlight: int = field(default=12, metadata={
        "help": f"classes drawn in colour on the map, the rest grey (at most {MAX_HIGHLIGHT})"})
    queries: int = field(default=6, metadata={"help": "query rows of retrieval.png"})
    seed: int = field(default=0, metadata={
        "help": "seed of the projection, the subset, the highlighted classes and the queries"})

    def __post_init__(self):
        check(self.run, "--run is required: the run folder to plot")
        check(self.max_points == 0 or self.max_points >= 2, f"--max-points {self.max_points}: must be 0 (all) or >= 2")
        check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        check(1 <= self.highlight <= MAX_HIGHLIGHT, f"--highlight {self.highlight}: must be 1-{MAX_HIGHLIGHT}")
        check(self.queries >= 1, f"--queries {self.queries}: must be >= 1")


def main(opts):
    for path in plot_run(opts.run, opts.method, opts.max_points, opts.seed, opts.highlight, opts.queries):
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main, Options, __doc__)
