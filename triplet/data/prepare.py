"""The prepared copy that every later stage reads: decoded once, upright, RGB, resized, manifests.

The images come from CUB's layout, a folder of class subfolders or a CSV manifest
(``triplet.data.sources``); the prepared folder is the same for all of them.

Decoding the original JPEGs (about 500x375, some grayscale, a few CMYK) on every access would
cost more than the model on a GPU; the prepared copy has short side ``resize`` and three
channels (JPEG, named ``.jpg``), and its manifests fix the splits. ``prepare.json`` is written
last; re-running with the same options does nothing, or redoes only images that went missing or
whose source changed (``triplet.data.provenance``).
"""
import contextlib
import functools
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from triplet.data import sources
from triplet.data.provenance import (SOURCE_FIELDS, SPLITS, listing_fingerprint, moved_between_splits,
                                     prepared_paths, remove_stale_images, source_stamps)
from triplet.data.layout import ROOT
from triplet.data.synthetic import make_synthetic_cub
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS, check_resized_pixels, open_rgb
from triplet.errors import UserError
from triplet.fileio import DiskFull, atomic_path, read_csv, read_json_object, write_csv, write_json
from triplet.machine import process_pool, usable_cores

MANIFEST_FIELDS = ["path", "class_id", "class_name", "image_id"]
LEAVE_ONE_OUT, QUERY_GALLERY = "leave-one-out", "query-gallery"


@dataclass
class DataOptions:
    """Options that decide which prepared copy is read; shared by prepare_data, train, evaluate."""
    data_dir: str = field(default="data", metadata={"help": "folder that holds CUB_200_2011/ and prepared/"})
    split: str = field(default="official", metadata={
        "choices": ["official", "classes"],
        "help": "official: CUB's train_test_split.txt (the study's protocol), or for your own images a "
                "stratified --test-fraction of each class's images; classes: classes 1-100 train / 101-200 "
                "test (the zero-shot retrieval protocol), or a seeded --test-fraction of your classes"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of the training part carved out for validation (images per class for "
                "official, whole classes for classes); never taken from the test set"})
    split_seed: int = field(default=0, metadata={"help": "seed of the validation carve-out"})
    resize: int = field(default=256, metadata={"help": "short side of the prepared images, in pixels"})
    crop_bbox: bool = field(default=False, metadata={"help": "crop each image to its bounding box first"})


def run_data_options(options, data_dir=""):
    """The DataOptions a run was trained with, from its options dict; ``data_dir`` overrides the folder."""
    data = DataOptions(**{k: options[k] for k in asdict(DataOptions()) if k in options})  # older runs: defaults
    if data_dir:
        data.data_dir = data_dir
    return data


def prepared_name(options):
    bbox = "-bbox" if options.crop_bbox else ""
    return f"{options.split}-r{options.resize}{bbox}-val{options.val_fraction:g}-seed{options.split_seed}"


def prepared_dir(options):
    return Path(options.data_dir) / "prepared" / prepared_name(options)


def _data_options(options):
    return {k: getattr(options, k) for k in asdict(DataOptions()) if k != "data_dir"}


def clip_box(bbox, size, source):
    """(x, y, w, h) -> a crop box inside the image; a box with no pixels in the image is refused."""
    x, y, w, h = bbox
    left, top = max(0, int(x)), max(0, int(y))
    right, bottom = min(size[0], int(round(x + w))), min(size[1], int(round(y + h)))
    if right <= left or bottom <= top:
        raise UserError(f"{source}: its bounding box {tuple(bbox)} (x, y, width, height in bounding_boxes.txt) "
                        f"lies outside the {size[0]}x{size[1]} image; fix the box or prepare without --crop-bbox")
    return left, top, right, bottom


def _prepare_image(source, target, resize, bbox, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode (open_rgb), crop, resize, save as JPEG; any problem names the file."""
    if target.exists():
        return
    image = open_rgb(source, max_pixels)
    if bbox is not None:
        image = image.crop(clip_box(bbox, image.size, source))
    scale = resize / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    check_resized_pixels(image.size, size, source, max_pixels)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        image.save(tmp, format="JPEG", quality=95)


def missing_images(prepared):
    """Manifest rows of a prepared folder whose image is gone (a deleted file, a copy cut short)."""
    prepared = Path(prepared)
    return [row["path"] for split in SPLITS if (prepared / f"{split}.csv").exists()
            for row in read_csv(prepared / f"{split}.csv", MANIFEST_FIELDS[:2]) if not (prepared / (row["path"] or "")).is_file()]


def _check_splits(splits, dataset, protocol):
    """Fail before (and again after) decoding: an empty split, a split of one class, or a class
    triplets cannot use (validation may be empty: training then goes without it)."""
    where = dataset.location
    more = {"folder": "add photos (a folder per class, two or more photos each)",
            "manifest": "add rows of another label to that split (two or more)"}.get(dataset.kind, "add images")
    for name in ("train", "val", "test"):
        if not splits[name] and name != "val":
            raise UserError(f"{where}: the {name} split of --split {protocol} is empty; add images or "
                            f"change --split/--test-fraction")
        counts = Counter(r.class_name for r in splits[name])
        if splits[name] and len(counts) < 2:
            raise UserError(f"{where}: the {name} split of --split {protocol} has {len(splits[name])} images in "
                            f"{len(counts)} class(es); triplets need at least two classes: {more}")
        lonely = sorted(c for c, n in counts.items() if n < 2)
        if lonely:
            example = next(r for r in splits[name] if r.class_name == lonely[0])
            raise UserError(f"{where}: class {lonely[0]!r} has {counts[lonely[0]]} {name} image "
                            f"({dataset.where(example.image_id)})"
                            f"{f' and {len(lonely) - 1} more such classes' if len(lonely) > 1 else ''}; "
                            f"triplets need at least two images of a class: add images or remove the class")


def _without_one_class_validation(splits, dataset, log=None):
    """Validation carved (not fixed by a manifest) from a set so small that it holds one class
    cannot measure triplets (no negative): its images go back to training, and the run trains
    without validation (its best checkpoint is then its lowest training loss)."""
    fixed = dataset.splits is not None and dataset.splits.get("val")
    if fixed or not splits["val"] or len({r.class_id for r in splits["val"]}) > 1:
        return splits
    if log:
        log(f"note: validation would hold {len(splits['val'])} images of one class (--val-fraction carves per "
            f"class, from classes of 4 or more training images); they stay in training, which runs without "
            f"validation")
    return {**splits, "train": splits["train"] + splits["val"], "val": []}


def _decode_all(dataset, targets, out, options, workers, skip_bad, log, max_pixels=DEFAULT_MAX_PIXELS):
    """Write every image into ``out/images`` (``targets``: ``prepared_paths``); return {image_id:
    error} of those skipped.

    ``workers``: decoding processes; -1 one per usable core (at most 8), 0 this process alone.
    """
    if options.crop_bbox and dataset.kind in ("folder", "manifest"):
        raise UserError(f"--crop-bbox: {dataset.location} has no bounding boxes (only CUB-layout sets do)")
    from tqdm import tqdm
    if workers < 0:
        workers = min(8, usable_cores())
    jobs = {r.image_id: (dataset.files[r.image_id], out / "images" / targets[r.image_id], options.resize,
                         r.bbox if options.crop_bbox else None, max_pixels) for r in dataset.records}
    log(f"preparing {len(jobs)} images into {out} with {workers or 'no extra'} processes")
    bad = {}
    with contextlib.ExitStack() as stack:
        if workers == 0:
            results = {image_id: functools.partial(_prepare_image, *job) for image_id, job in jobs.items()}
        else:
            pool = stack.enter_context(process_pool(workers))
            results = {image_id: pool.submit(_prepare_image, *job).result for image_id, job in jobs.items()}
            stack.callback(pool.shutdown, cancel_futures=True)  # on an error, skip what has not started
        for image_id, result in tqdm(results.items(), desc="prepare", unit="img"):
            try:
                result()
            except DiskFull:  # the disk's fault, not the image's: --skip-bad would skip every image after it
                raise
            except UserError as e:
                line = f" (listed at {dataset.lines[image_id]})" if image_id in dataset.lines else ""
                if not skip_bad:
                    raise UserError(f"{e}{line}; or pass --skip-bad to leave such files out") from e
                bad[image_id] = f"{e}{line}"
    for error in bad.values():
        log(f"skipped {error}")
    if bad:
        log(f"skipped {len(bad)} unreadable image(s) of {len(dataset.records)} (--skip-bad); listed in prepare.json")
    return bad


def prepare(options, workers=-1, log=print, max_pixels=DEFAULT_MAX_PIXELS, dataset=None, test_fraction=0.2,
            skip_bad=False):
    """Build (or find) the prepared copy for ``options``; return its folder.

    ``workers``: decoding processes; -1 one per usable core (at most 8), 0 this process alone.
    A complete copy is left alone; one with images missing is completed (existing images kept).
    ``dataset``: a ``triplet.data.sources.Dataset`` (default: the CUB layout in ``options.data_dir``);
    ``test_fraction`` splits a folder or a split-less manifest; ``skip_bad`` leaves unreadable images out.
    """
    out = prepared_dir(options)
    marker = out / "prepare.json"
    dataset = dataset or sources.from_cub(options.data_dir)
    stamps, targets = source_stamps(dataset, options.crop_bbox), prepared_paths(dataset.records)
    identity = {**dataset.info(), "listed": len(dataset.records), "fingerprint": listing_fingerprint(dataset, stamps)}
    if dataset.kind in ("folder", "manifest") and dataset.splits is None:
        identity["test_fraction"] = test_fraction
    if marker.exists():
        previous = read_json_object(marker)
        before = previous.get("dataset", {})
        if before and (before.get("kind"), before.get("name")) != (dataset.kind, dataset.name):
            raise UserError(f"{out}: holds a prepared copy of {before.get('source')}, not {identity['source']}; "
                            f"pass another --data-dir")
        if previous.get("options") == _data_options(options) and before == identity \
                and previous.get("skip_bad", False) == skip_bad:
            missing = missing_images(out)
            if not missing:
                log(f"{out}: already prepared with these options; nothing to do")
                return out
            log(f"{out}: {len(missing)} prepared image(s) missing (first: {missing[0]}); preparing them again")
        elif before and "fingerprint" not in before:
            log(f"{out}: prepared by an earlier version, which kept no record of its sources; recording them "
                f"(images already prepared are kept)")
        elif before and before["fingerprint"] != identity["fingerprint"]:
            log(f"{out}: {dataset.location} changed since it was prepared (images or labels added, removed, "
                f"moved or edited); preparing it again")
        remove_stale_images(out, dataset.records, stamps, targets)

    def split(records, log=None):
        return _without_one_class_validation(sources.make_splits(
            dataset, records, options.split, test_fraction, options.val_fraction, options.split_seed), dataset, log)

    _check_splits(split(dataset.records), dataset, options.split)
    bad = _decode_all(dataset, targets, out, options, workers, skip_bad, log, max_pixels)
    splits = split([r for r in dataset.records if r.image_id not in bad], log)
    _check_splits(splits, dataset, options.split)
    if dataset.roles:
        for role in ("query", "gallery"):
            splits[role] = [r for r in splits["test"] if dataset.roles[r.image_id] == role]
    moved = moved_between_splits(out, splits, targets)
    if moved:
        log(f"note: {len(moved)} image(s) changed split since the last preparation (e.g. {moved[0]}): a run trained "
            f"on the previous copy may have trained on today's test images; resuming or evaluating such a run "
            f"is refused: train it again")
    for name, part in splits.items():
        rows = [{"path": f"images/{targets[r.image_id]}", "class_id": r.class_id, "class_name": r.class_name,
                 "image_id": r.image_id} for r in part]
        write_csv(out / f"{name}.csv", rows, MANIFEST_FIELDS)
    write_csv(out / "sources.csv", [dict(zip(SOURCE_FIELDS, (targets[i], *stamp))) for i, stamp in stamps.items()],
              SOURCE_FIELDS)
    counts = {name: len(part) for name, part in splits.items()}
    classes = {name: len({r.class_id for r in part}) for name, part in splits.items()}
    write_json(marker, {"options": _data_options(options), "dataset": identity,
                        "protocol": QUERY_GALLERY if dataset.roles else LEAVE_ONE_OUT, "images": counts,
                        "classes": classes, "skip_bad": skip_bad,
                        "skipped": [{"file": str(dataset.files[i]), "error": e} for i, e in bad.items()]})
    log(f"prepared {counts} images ({classes} classes) of {dataset.name} ({dataset.kind}) in {out}")
    return out


def synthetic_set(workdir, classes, per_class, synthetic_size, resize):
    """A synthetic CUB-layout set under ``workdir``, named by its size, written once (by every
    core) and reused, and its prepared copy at short side ``resize``: (set folder, prepared folder).
    The benchmarks and ``make gpu-check`` train on it offline."""
    data_dir = Path(workdir) / f"synthetic-{classes}x{per_class}-{synthetic_size}px"
    if not (data_dir / ROOT).exists():
        print(f"writing {classes * per_class} synthetic {synthetic_size}-px JPEGs to {data_dir}")
        make_synthetic_cub(data_dir, classes, per_class, synthetic_size, seed=0, processes=-1)
    options = DataOptions(data_dir=str(data_dir), resize=resize)
    prepare(options, log=lambda *a: None)
    return data_dir, prepared_dir(options)


def _as_flags(options):
    """Prepared-copy options as the command-line flags that select them."""
    flags = [f"--split {options['split']}", f"--resize {options['resize']}",
             f"--val-fraction {options['val_fraction']:g}", f"--split-seed {options['split_seed']}"]
    return " ".join(flags + (["--crop-bbox"] if options.get("crop_bbox") else []))


def missing_prepared_message(prepared):
    """Why ``prepared`` is not there, and the prepared copies that are (with the flags that pick them)."""
    prepared = Path(prepared)
    data_dir = prepared.parent.parent
    if not data_dir.is_dir():
        return (f"{data_dir}: data folder not found; if it moved, pass --data-dir with its new place, else "
                f"prepare it with scripts/prepare_data.py (or `make data`)")
    others = []
    for marker in sorted(prepared.parent.glob("*/prepare.json")):
        try:
            others.append(f"{marker.parent.name} ({_as_flags(read_json_object(marker)['options'])})")
        except (UserError, KeyError, TypeError):
            continue
    text = (f"{prepared}: no prepared data for these options; --resize, --val-fraction, --split, --split-seed "
            f"and --crop-bbox must match the prepare_data.py run that made it: run `python scripts/prepare_data.py` "
            f"with the same options (or `make data`)")
    if others:
        text += f"; prepared under {prepared.parent}: " + ", ".join(others)
    return text


def query_mask(prepared, paths):
    """For the query-gallery protocol: which of ``paths`` (the test split) are queries; else None."""
    if read_prepare_info(prepared)["protocol"] != QUERY_GALLERY:
        return None
    queries = set(read_manifest(prepared, "query")[0])
    return np.array([p in queries for p in paths])


def read_prepare_info(prepared):
    """The dataset (name, kind, source) and evaluation protocol recorded in a prepared folder's prepare.json."""
    marker = Path(prepared) / "prepare.json"
    info = read_json_object(marker) if marker.exists() else {}
    dataset = info.get("dataset") or {"name": "unknown", "kind": "unknown", "source": ""}
    return {"dataset": {k: dataset.get(k) for k in ("name", "kind", "source")},
            "protocol": info.get("protocol", LEAVE_ONE_OUT)}


def read_manifest(prepared, split):
    """Return (absolute image paths, class ids) of one split of a prepared folder, checked."""
    prepared = Path(prepared)
    path = prepared / f"{split}.csv"
    if not (prepared / "prepare.json").exists() or not path.exists():
        raise UserError(missing_prepared_message(prepared))
    paths, labels = [], []
    for line, row in enumerate(read_csv(path, MANIFEST_FIELDS[:2]), start=2):
        image = prepared / (row["path"] or "")
        try:
            labels.append(int(row["class_id"]))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}:{line}: class_id {row['class_id']!r} is not an integer") from e
        if not row["path"] or not image.is_file():
            raise UserError(f"{path}:{line}: image {image} is missing; the prepared copy is incomplete: run "
                            f"scripts/prepare_data.py again with the same options (it redoes missing images)")
        paths.append(str(image))
    return paths, labels
