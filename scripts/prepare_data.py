"""Get CUB-200-2011 (download, a local archive, a synthetic set) or your own images, and build the prepared copy.

    python scripts/prepare_data.py                          # download, verify, extract, prepare
    python scripts/prepare_data.py --image-folder my_photos # my_photos/<class>/*.jpg -> data/my_photos/prepared/
    python scripts/prepare_data.py --manifest photos.csv --split classes --skip-bad
    python scripts/prepare_data.py --archive ~/CUB_200_2011.tgz
    python scripts/prepare_data.py --split classes --crop-bbox
    python scripts/prepare_data.py --synthetic --data-dir /tmp/x --classes 12 --per-class 10
"""
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from triplet.data import cub, sources
from triplet.cli import check, run
from triplet.errors import UserError
from triplet.data.prepare import DataOptions, prepare
from triplet.data.synthetic import MAX_CLASSES
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS


@dataclass
class Options(DataOptions):
    archive: str = field(default="", metadata={
        "help": "use this local CUB_200_2011.tgz instead of downloading (verified by MD5)"})
    md5: str = field(default=cub.CUB_MD5, metadata={
        "help": "expected MD5 of the archive; change it only for an archive you built yourself"})
    no_download: bool = field(default=False, metadata={
        "help": "fail instead of downloading when the dataset is absent"})
    image_folder: str = field(default="", metadata={
        "help": "prepare your own images instead: one subfolder per class (DIR/<class>/**/<image>); only read. "
                "--data-dir then defaults to data/<folder name>"})
    manifest: str = field(default="", metadata={
        "help": "prepare the images a CSV lists instead: path,label[,split] with paths relative to the CSV; split is "
                "train, val, test, or query/gallery (each query ranked against the gallery only)"})
    test_fraction: float = field(default=0.2, metadata={
        "help": "--image-folder, or --manifest without a split column: share of each class's images (--split "
                "official) or of the classes (--split classes) held out for testing, seeded by --split-seed"})
    skip_bad: bool = field(default=False, metadata={
        "help": "leave unreadable or truncated images out (listed on screen and in prepare.json) instead of failing"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse an image with more pixels than this (a decompression bomb); 64 million passes 50-megapixel photos"})
    max_members: int = field(default=cub.MAX_MEMBERS, metadata={
        "help": "refuse an archive with more members than this (the CUB archive has about 12,000)"})
    max_extract_gb: float = field(default=cub.MAX_EXTRACT_BYTES / 1e9, metadata={
        "help": "refuse an archive that unpacks to more gigabytes than this (the CUB archive: about 1.2)"})
    workers: int = field(default=-1, metadata={
        "help": "processes that decode images, or draw them with --synthetic (-1: one per usable core, at most 8 "
                "when decoding; 0: this process)"})
    synthetic: bool = field(default=False, metadata={
        "help": "write a synthetic dataset in the exact CUB_200_2011 layout instead (no network)"})
    classes: int = field(default=200, metadata={"help": "--synthetic: number of classes"})
    per_class: int = field(default=60, metadata={"help": "--synthetic: images per class"})
    synthetic_size: int = field(default=500, metadata={
        "help": "--synthetic/--digits: image width in pixels (height is 3/4 of it, like CUB)"})
    seed: int = field(default=0, metadata={"help": "--synthetic: random seed"})
    digits: bool = field(default=False, metadata={
        "help": "write scikit-learn's 1,797 real handwritten digits (10 classes) in the CUB layout instead, "
                "at --synthetic-size (an offline real-image set)"})
    pack: str = field(default="", metadata={
        "help": "--synthetic/--digits: also pack the set as a .tgz at this path (like the official archive) and print its MD5"})

    def __post_init__(self):
        check(self.resize >= 8, "--resize must be at least 8 pixels")
        check(0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)")
        check(self.workers >= -1, "--workers must be -1 (automatic), 0 or more")
        check(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")
        check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        check(self.split_seed >= 0, f"--split-seed {self.split_seed}: must be >= 0")
        check(2 <= self.classes <= MAX_CLASSES, f"--classes {self.classes}: must be 2-{MAX_CLASSES} (distinct synthetic classes)")
        check(self.per_class >= 4, f"--per-class {self.per_class}: must be >= 4 (two train and two test images a class: "
                                   f"triplets need pairs)")
        check(self.synthetic_size >= 16, f"--synthetic-size {self.synthetic_size}: must be >= 16 pixels")
        check(self.max_members >= 1, f"--max-members {self.max_members}: must be >= 1")
        check(self.max_extract_gb > 0, f"--max-extract-gb {self.max_extract_gb}: must be > 0")
        sources_given = [name for name in ("synthetic", "digits", "image_folder", "manifest") if getattr(self, name)]
        check(len(sources_given) <= 1, f"--{' and --'.join(n.replace('_', '-') for n in sources_given)}: pick one")
        check(0 < self.test_fraction < 1, f"--test-fraction {self.test_fraction}: must be in (0, 1)")
        if (self.image_folder or self.manifest) and self.data_dir == DataOptions.data_dir:
            self.data_dir = str(Path(DataOptions.data_dir) / Path(self.image_folder or self.manifest).resolve().stem)


def prepare_own_images(opts):
    """--image-folder / --manifest: read the source (never written), prepare, say what comes next."""
    if opts.image_folder:
        folder = Path(opts.image_folder).resolve()
        if Path(opts.data_dir).resolve().is_relative_to(folder):
            raise UserError(f"--data-dir {opts.data_dir}: inside --image-folder {opts.image_folder}, which is only "
                            f"read; put the prepared copy elsewhere")
        dataset = sources.from_image_folder(opts.image_folder)
    else:
        dataset = sources.from_manifest(opts.manifest)
    prepared = prepare(opts, opts.workers, max_pixels=opts.max_pixels, dataset=dataset, test_fraction=opts.test_fraction,
                       skip_bad=opts.skip_bad)
    defaults = DataOptions()
    options = " ".join(f"--{name.replace('_', '-')} {shlex.quote(str(getattr(opts, name)))}" for name in
                       ("data_dir", "split", "val_fraction", "split_seed", "resize")
                       if name == "data_dir" or getattr(opts, name) != getattr(defaults, name))
    print(f"next: python scripts/train.py {options} --out {shlex.quote(f'results/{dataset.name}-resnet18')} "
          f"(these options find {prepared})")


def main(opts):
    data_dir = Path(opts.data_dir)
    if opts.image_folder or opts.manifest:
        return prepare_own_images(opts)
    if opts.synthetic or opts.digits:
        from triplet.data import synthetic
        from triplet.data.layout import pack_archive
        if opts.digits:
            root = synthetic.make_digits_cub(data_dir, opts.synthetic_size, opts.seed)
            print(f"wrote scikit-learn's handwritten digits in the CUB-200-2011 layout to {root}")
        else:
            root = synthetic.make_synthetic_cub(data_dir, opts.classes, opts.per_class, opts.synthetic_size, opts.seed,
                                              processes=opts.workers)
            print(f"wrote a synthetic CUB-200-2011 ({opts.classes} classes x {opts.per_class} images) to {root}")
        if opts.pack:
            print(f"packed {opts.pack} (MD5 {pack_archive(data_dir, opts.pack)})")
        print(f"next: python scripts/prepare_data.py --data-dir {shlex.quote(str(data_dir))}")
        return
    if not (data_dir / "CUB_200_2011").is_dir():
        if opts.archive:
            archive = Path(opts.archive)
            if not archive.is_file():
                raise UserError(f"--archive {archive}: file not found")
            print(f"verifying {archive}")
            cub.verify_md5(archive, opts.md5)
        elif opts.no_download:
            raise UserError(f"{data_dir / 'CUB_200_2011'}: dataset not found and --no-download given; "
                            f"pass --archive PATH or run `make data`")
        else:
            archive = cub.download(data_dir / cub.CUB_ARCHIVE, md5=opts.md5)
        print(f"extracting {archive} into {data_dir}")
        cub.safe_extract(archive, data_dir, opts.max_members, int(opts.max_extract_gb * 1e9))
    prepare(opts, workers=opts.workers, max_pixels=opts.max_pixels)


if __name__ == "__main__":
    run(main, Options, __doc__)
