"""Write RESULTS/REPORT.md: every evaluated run beside the numbers the study published for it.

    python scripts/report.py --results results          # or: make report

One summary table ranked by test Precision@1 (best marked, untrained baselines included), then per
run: the study's metrics side by side (folders named exp{1-6}-{backbone}), Recall@K, MAP@R,
R-Precision, NMI, links to the figures, and the train / evaluate commands rebuilt from config.json.
results/onnx_benchmark.md and results/train_benchmark.md are included when present.
"""
from dataclasses import dataclass, field

from triplet.cli import check, plural, run
from triplet.reporting.report import write_report


@dataclass
class Options:
    results: str = field(default="results", metadata={"help": "folder of run folders; REPORT.md is written there"})

    def __post_init__(self):
        check(self.results, "--results must name a folder")


def main(opts):
    path, count = write_report(opts.results)
    print(f"wrote {path} ({plural(count, 'run')})")


if __name__ == "__main__":
    run(main, Options, __doc__)
