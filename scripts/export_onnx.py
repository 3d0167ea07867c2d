"""Export a trained run to ONNX, verify it against torch on test images, optionally quantise to INT8.

    python scripts/export_onnx.py                                  # the best run under results/
    python scripts/export_onnx.py --results results --int8         # `make export`
    python scripts/export_onnx.py --run results/exp7-resnet18 --out exports/exp7.onnx

The model takes ``images`` (float32 N x 3 x S x S, normalised as in evaluation) and returns
``embeddings`` (N x D, L2-normalised); its metadata says how to preprocess, so
``triplet.deploy.inference.OnnxEmbedder`` and scripts/search.py need nothing else. An export that
disagrees with torch, or an INT8 model that loses more than --max-drop points of test
Precision@1, is kept aside as *.rejected.onnx and the exit status is 3.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from triplet.cli import check, run


@dataclass
class Options:
    results: str = field(default="results", metadata={"help": "without --run: export the run under this folder "
                                                              "with the best test Precision@1"})
    run: str = field(default="", metadata={"help": "run folder to export (default: the best under --results)"})
    out: str = field(default="", metadata={"help": "ONNX file to write (default: exports/<run name>.onnx)"})
    int8: bool = field(default=False, metadata={"help": "also write a static INT8 model, <name>.int8.onnx"})
    calibration_images: int = field(default=300, metadata={"help": "training images that calibrate INT8"})
    max_drop: float = field(default=1.0, metadata={"help": "largest test Precision@1 loss (points) INT8 may cost"})
    verify_images: int = field(default=128, metadata={"help": "test images compared with torch (0: all)"})
    data_dir: str = field(default="", metadata={"help": "data folder (default: the one the run was trained on)"})

    def __post_init__(self):
        check(not self.out or self.out.endswith(".onnx"), f"--out {self.out}: must end with .onnx")
        check(self.calibration_images >= 1, "--calibration-images must be >= 1")
        check(self.verify_images >= 0, "--verify-images must be >= 0")
        check(math.isfinite(self.max_drop) and self.max_drop >= 0,
              f"--max-drop {self.max_drop}: must be a number of points >= 0 (nan would let any INT8 model through)")


def main(opts):
    from triplet.deploy.export import best_run, export_run  # torch: imported here so --help is instant

    run_dir = Path(opts.run) if opts.run else best_run(opts.results)
    if not opts.run:
        print(f"exporting {run_dir} (best test Precision@1 under {opts.results})")
    out = opts.out or Path("exports") / f"{run_dir.resolve().name}.onnx"
    export_run(run_dir, out, opts.int8, opts.calibration_images, opts.max_drop, opts.verify_images, opts.data_dir)


if __name__ == "__main__":
    run(main, Options, __doc__)
