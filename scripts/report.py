"""Write RESULTS/REPORT.md: every evaluated run beside the numbers the study published for it.

    python scripts/report.py --results results          # or: make report
    python scripts/report.py --demo-table results/demo-resnet18   # print the README's demo table
    python scripts/report.py --demo-table runs/seed0 runs/seed1 runs/seed2   # mean ± sd across seeds

One summary table ranked by test Precision@1 (best marked, untrained baselines included), then per
run: the study's metrics side by side (folders named exp{1-6}-{backbone}), Recall@K, MAP@R,
R-Precision, NMI, links to the figures, and the train / evaluate commands rebuilt from config.json.
results/onnx_benchmark.md and results/train_benchmark.md are included when present.
--demo-table prints (Markdown, to stdout) the demo run's metrics beside the untrained model it
started from, from its metrics.json and metrics_untrained.json, and writes nothing; given several
run folders (seeds), each metric's mean, standard deviation and range.
"""
from dataclasses import dataclass, field

from triplet.cli import check, plural, run
from triplet.reporting.demo import demo_table, read_demo_metrics, seeds_table, training_seed
from triplet.reporting.report import write_report


@dataclass
class Options:
    results: str = field(default="results", metadata={"help": "folder of run folders; REPORT.md is written there"})
    demo_table: list[str] = field(default_factory=list, metadata={
        "nargs": "+", "type": str,
        "help": "instead, print the Markdown table of this demo run folder (trained versus untrained) and exit; "
                "several folders (seeds): mean ± sd (min to max) of each metric"})

    def __post_init__(self):
        check(self.results, "--results must name a folder")


def main(opts):
    if opts.demo_table:
        pairs = [read_demo_metrics(run_dir) for run_dir in opts.demo_table]
        seeds = [training_seed(run_dir) for run_dir in opts.demo_table]
        print(demo_table(*pairs[0]) if len(pairs) == 1 else seeds_table(pairs, seeds))
        return
    path, count = write_report(opts.results)
    print(f"wrote {path} ({plural(count, 'run')})")


if __name__ == "__main__":
    run(main, Options, __doc__)
