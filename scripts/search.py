"""Find similar birds: the gallery images closest to each query, by cosine similarity.

    python scripts/search.py --model exports/exp7-resnet18.onnx --gallery photos/ --query bird.jpg
    python scripts/search.py --model M.onnx --gallery DIR --query a.jpg b.jpg --top-k 10 --grid hits.png
    python scripts/search.py --model M.onnx --gallery DIR --query DIR/x/1.jpg --exclude-self --json

Embeds every image under --gallery (recursively) once and caches the embeddings outside it
(--cache, default $XDG_CACHE_HOME/triplet or ~/.cache/triplet), keyed by the model and each file's
contents; later searches embed only added or changed files. Unreadable files are skipped with a
warning; symlinks leading outside the gallery are not followed. --index faiss serves big
galleries (docs/deploy.md). Needs only onnxruntime, NumPy and Pillow (no torch).
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triplet.cli import check, run
from triplet.deploy.gallery import GalleryOptions, load_gallery
from triplet.deploy.grid import draw_grid
from triplet.deploy.inference import OnnxEmbedder


@dataclass
class Options(GalleryOptions):
    query: list[str] = field(default_factory=list, metadata={"required": True, "nargs": "+", "type": str,
                                                             "help": "one or more query images"})
    top_k: int = field(default=5, metadata={"help": "matches to print per query"})
    exclude_self: bool = field(default=False, metadata={"help": "leave a query out of its own results "
                                                        "when it is also in the gallery"})
    json: bool = field(default=False, metadata={"help": "print the results as JSON (messages go to stderr)"})
    grid: str = field(default="", metadata={"help": "also draw each query and its matches with scores "
                                            "into this PNG"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar while embedding"})

    def __post_init__(self):
        super().__post_init__()
        check(self.query, "--query is required: one or more images")
        check(self.top_k >= 1, "--top-k must be >= 1")
        check(not self.grid or self.grid.lower().endswith(".png"), f"--grid {self.grid}: must end in .png")


def log(message):
    print(message, file=sys.stderr)


def self_positions(queries, gallery):
    """The gallery position of each query file (same file after resolving links), else -1."""
    position = {path.resolve(): i for i, path in enumerate(gallery.files)}
    return np.array([position.get(Path(q).resolve(), -1) for q in queries], np.int64)


def main(opts):
    embedder = OnnxEmbedder(opts.model, max_pixels=opts.max_pixels)
    queries = embedder.embed(opts.query, opts.batch_size)  # first: a bad query fails before a long gallery pass
    gallery = load_gallery(embedder, opts.gallery, opts.cache or None, opts.index, opts.batch_size,
                           progress=not opts.no_progress, log=log, use_cache=not opts.no_cache)
    exclude = self_positions(opts.query, gallery) if opts.exclude_self else None
    indices, sims = gallery.search(queries, opts.top_k, exclude)
    classes = gallery.classes()
    results = [{"query": query, "matches": [
        {"rank": rank, "path": gallery.rel[i], "score": round(float(sim), 6), "class": classes[i]}
        for rank, (i, sim) in enumerate(((i, s) for i, s in zip(row, row_sims) if i >= 0), 1)]}
        for query, row, row_sims in zip(opts.query, indices, sims)]
    if opts.json:
        print(json.dumps({"model": opts.model, "gallery": str(gallery.root), "index": gallery.index.kind,
                          "gallery_size": len(gallery),
                          "skipped": [{"path": str(p), "error": why} for p, why in gallery.skipped],
                          "results": results}, indent=2))
    else:
        for result in results:
            print(f"{result['query']}:")
            for match in result["matches"]:
                print(f"  {match['rank']:2d}. {match['score']:.4f}  {match['path']}")
    if opts.grid:
        draw_grid([(Path(r["query"]), [(gallery.root / m["path"], m["score"], m["class"] or m["path"])
                                       for m in r["matches"]]) for r in results], opts.grid)
        log(f"wrote {opts.grid}")


if __name__ == "__main__":
    run(main, Options, __doc__)
