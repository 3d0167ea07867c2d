"""Find similar birds: the gallery images closest to each query, by cosine similarity.

    python scripts/search.py --model exports/exp7-resnet18.onnx --gallery photos/ --query bird.jpg
    python scripts/search.py --model M.onnx --gallery DIR --query a.jpg b.jpg --top-k 10

Embeds every image under --gallery (recursively) once and caches the embeddings in
DIR/.triplet-gallery-<model hash>.npz; later searches re-embed only added or changed files.
Needs only onnxruntime, NumPy and Pillow (no torch).
"""
from dataclasses import dataclass, field
from pathlib import Path

from triplet.cli import check, run
from triplet.deploy.inference import OnnxEmbedder, gallery_embeddings
from triplet.deploy import neighbours
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "exported model (scripts/export_onnx.py)"})
    gallery: str = field(default="", metadata={"help": "folder of images to search (recursively)"})
    query: list[str] = field(default_factory=list, metadata={"nargs": "+", "type": str,
                                                             "help": "one or more query images"})
    top_k: int = field(default=5, metadata={"help": "matches to print per query"})
    batch_size: int = field(default=64, metadata={"help": "images per onnxruntime call"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse an image with more pixels than this (a decompression bomb); 64 million passes 50-megapixel photos"})

    def __post_init__(self):
        check(self.model, "--model is required: an ONNX file written by scripts/export_onnx.py")
        check(self.gallery, "--gallery is required: a folder of images")
        check(self.query, "--query is required: one or more images")
        check(self.top_k >= 1, "--top-k must be >= 1")
        check(self.batch_size >= 1, "--batch-size must be >= 1")
        check(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")


def main(opts):
    embedder = OnnxEmbedder(opts.model, max_pixels=opts.max_pixels)
    queries = embedder.embed(opts.query, opts.batch_size)  # first: a bad query fails before a long gallery pass
    paths, gallery = gallery_embeddings(embedder, opts.gallery, opts.batch_size)
    indices, sims = neighbours.top_k(queries, gallery, opts.top_k)
    for query, row, row_sims in zip(opts.query, indices, sims):
        print(f"{query}:")
        for rank, (i, sim) in enumerate(zip(row, row_sims), 1):
            print(f"  {rank:2d}. {sim:.4f}  {Path(paths[i]).relative_to(opts.gallery).as_posix()}")


if __name__ == "__main__":
    run(main, Options, __doc__)
