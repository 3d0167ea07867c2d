"""Gallery search at scale: exact NumPy versus faiss flat, HNSW and IVF, on 1e4 to 1e6 vectors.

    python scripts/benchmark_search.py --out results/search_benchmark.json        # `make bench-search`
    python scripts/benchmark_search.py --sizes 10000 100000 --run results/exp7-resnet18

For each gallery size, seeded random unit vectors (--dim, default 128) and --queries queries
drawn the same way: build time, the saved index's size, single-query latency p50/p99, a batch
of --batch queries, and recall@--k of each approximate index (HNSW over a range of efSearch,
IVF over a range of nprobe) against exact search, all in the same run. With --run, the same on
that run's real test embeddings (test_embeddings.npz) as gallery and queries. Writes the JSON
(--out) and a Markdown table beside it; the target row says whether the largest gallery was
answered in <= --target-ms p50 at recall >= --target-recall. Random vectors are the hardest case
for approximate search (docs/deploy.md explains why, with this benchmark's figures).
"""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triplet.bench.cpu import others_cell
from triplet.bench.search import benchmark_gallery, best_meeting, load_now, unit_vectors
from triplet.cli import check, run
from triplet.deploy.server import load_browse_set
from triplet.fileio import write_json, write_text


@dataclass
class Options:
    out: str = field(default="results/search_benchmark.json", metadata={"help": "JSON results (and .md beside it)"})
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000],
                             metadata={"nargs": "+", "type": int, "help": "gallery sizes (default: 1e4 1e5 1e6)"})
    dim: int = field(default=128, metadata={"help": "vector dimension"})
    queries: int = field(default=200, metadata={"help": "queries timed one by one (and checked for recall)"})
    batch: int = field(default=100, metadata={"help": "queries per batch call"})
    k: int = field(default=10, metadata={"help": "neighbours per query (recall@k)"})
    hnsw_max: int = field(default=100_000, metadata={"help": "largest gallery to build HNSW for (its build "
                          "is the slow part: minutes per 1e5 vectors on 2 busy cores)"})
    run: str = field(default="", metadata={"help": "also benchmark this run's real test embeddings"})
    seed: int = field(default=0, metadata={"help": "seed of the random vectors"})
    target_ms: float = field(default=5.0, metadata={"help": "target single-query p50 on the largest gallery"})
    target_recall: float = field(default=0.95, metadata={"help": "target recall@k on the largest gallery"})

    def __post_init__(self):
        check(all(s >= 100 for s in self.sizes), "--sizes must each be >= 100")
        check(self.dim >= 2 and self.k >= 1 and self.batch >= 1, "--dim >= 2, --k >= 1 and --batch >= 1")
        check(1 <= self.queries <= min(self.sizes), "--queries must be from 1 to the smallest --sizes")


def markdown(report):
    k = report["k"]
    lines = [f"Search benchmark on {report['cpu']} ({report['cores']} cores; load average "
             f"{report['load_before'][0]} before, {report['load_after'][0]} after): {report['queries']} single "
             f"queries, batches of {report['batch']}, recall@{k} against exact search.", "",
             f"| gallery | index | settings | build (s) | size (MB) | single p50 (ms) | single p99 (ms) | "
             f"batch per query (ms) | recall@{k} | CPU used by others |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        others = others_cell(r["others_cpu_share"])
        lines.append(f"| {r['gallery']} | {r['index']} | {r['settings']} | {r['build_s']:.1f} | {r['size_mb']:.1f} | "
                     f"{r['single_p50_ms']:.3f} | {r['single_p99_ms']:.3f} | {r['batch_per_query_ms']:.3f} | "
                     f"{r[f'recall_at_{k}']:.3f} | {others} |")
    t = report["target"]
    lines += ["", f"Target: {t['gallery']} vectors, single-query p50 <= {t['ms']} ms at recall@{k} >= {t['recall']}: "
              + (f"met by {t['best']['index']} {t['best']['settings']} ({t['best']['single_p50_ms']} ms, recall "
                 f"{t['best'][f'recall_at_{k}']})" if t["met"] else "not met") + ".", ""]
    return "\n".join(lines)


def main(opts):
    from triplet.machine import cpu_name

    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_now(), "dim": opts.dim, "k": opts.k,
              "queries": opts.queries, "batch": opts.batch, "seed": opts.seed, "results": []}
    galleries = [(f"random {n:.0e}".replace("+0", ""), n) for n in sorted(opts.sizes)]
    if opts.run:
        galleries.append((f"run {Path(opts.run).name}", None))
    for name, size in galleries:
        if size is None:
            gallery = load_browse_set(opts.run)["embeddings"]
            queries = gallery[np.random.default_rng(opts.seed).permutation(len(gallery))[:opts.queries]]
        else:
            gallery = unit_vectors(size, opts.dim, opts.seed)
            queries = unit_vectors(opts.queries, opts.dim, opts.seed + 1)
        print(f"{name}: {len(gallery)} x {gallery.shape[1]}", flush=True)
        started = time.perf_counter()
        rows = benchmark_gallery(gallery, queries, opts.k, opts.batch, hnsw=len(gallery) <= opts.hnsw_max)
        report["results"] += [{"gallery": name, "size": len(gallery), **row} for row in rows]
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    largest = max(opts.sizes)
    rows = [r for r in report["results"] if r["size"] == largest and r["gallery"].startswith("random")]
    best = best_meeting([r for r in rows if r["single_p50_ms"] <= opts.target_ms], opts.k, opts.target_recall)
    report["target"] = {"gallery": largest, "ms": opts.target_ms, "recall": opts.target_recall, "met": best is not None,
                        "best": best or best_meeting(rows, opts.k, opts.target_recall)}
    report["load_after"] = load_now()
    write_json(opts.out, report)
    write_text(Path(opts.out).with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {opts.out} and {Path(opts.out).with_suffix('.md')}")


if __name__ == "__main__":
    run(main, Options, __doc__)
