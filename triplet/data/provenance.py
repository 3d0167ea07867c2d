"""Which source each prepared image comes from, whether that source changed, and which images a
run trained on.

A prepared copy names one file per source (``prepared_paths``) and records each source's stamp
(``sources.csv``: absolute path, size, mtime, crop box), so a re-run of prepare_data decodes only
what changed; a run records digests of its train and val manifests (``training_digests``), so a
resume or an evaluation on a copy whose training images changed is refused (``check_same_splits``).
"""
import contextlib
import hashlib
import os
from pathlib import Path

from triplet.errors import UserError
from triplet.fileio import read_csv
from triplet.runs import read_config

SPLITS = ("train", "val", "test")


def prepared_relative_path(path):
    """Prepared images are JPEGs and named so: ``a.png`` becomes ``a.png.jpg``."""
    return path if path.lower().endswith((".jpg", ".jpeg")) else f"{path}.jpg"


def prepared_paths(records):
    """{image_id: path in the prepared images/}, one file per source: a JPEG keeps its name, others
    gain ``.jpg``, and a name another source already takes (``a.png`` beside a real ``a.png.jpg``,
    or names that differ only in case, one file on macOS and Windows) gains the image's id."""
    paths, taken = {}, set()
    for record in sorted(records, key=lambda r: not r.path.lower().endswith((".jpg", ".jpeg"))):
        path = prepared_relative_path(record.path)
        while path.casefold() in taken:
            path = f"{path}.{record.image_id}.jpg"
        taken.add(path.casefold())
        paths[record.image_id] = path
    return paths


SOURCE_FIELDS = ["path", "source", "size", "mtime_ns", "bbox"]


def source_stamps(dataset, crop_bbox=False):
    """{image_id: (absolute source file, size, mtime_ns, crop box)}: what tells an edited or replaced
    photo (or, with --crop-bbox, an edited box) from the one prepared before. Absolute, so
    ``--data-dir d`` and ``--data-dir $PWD/d`` name the same file; a file that cannot be read is
    stamped as missing (decoding names it)."""
    stamps = {}
    for record in dataset.records:
        source = os.path.abspath(dataset.files[record.image_id])
        try:
            stat = os.stat(source)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        stamps[record.image_id] = (source, size, mtime, repr(record.bbox) if crop_bbox else "")
    return stamps


def listing_fingerprint(dataset, stamps):
    """A digest of every image's label, split role and file stamp: a relabelled, moved, replaced or
    swapped photo changes it even where the count of images stays the same."""
    digest = hashlib.sha256()
    fixed = {i: name for name, ids in (dataset.splits or {}).items() for i in ids}
    for record in dataset.records:
        digest.update(repr((record.path, record.class_name, record.is_train, fixed.get(record.image_id),
                            dataset.roles.get(record.image_id), record.bbox, stamps[record.image_id])).encode())
    return digest.hexdigest()[:16]


def training_digests(prepared):
    """{"train": digest, "val": digest} of a prepared folder's manifests as they are on disk (each
    image's path and class): a run records them, and a resume or an evaluation where they changed
    is refused. Only these two: a test split that changed alone cannot hold an image the run saw."""
    digests = {}
    for name in ("train", "val"):
        digest = hashlib.sha256()
        path = Path(prepared) / f"{name}.csv"
        for row in read_csv(path, ["path", "class_name"]) if path.exists() else []:
            digest.update(f"{row['path']}\t{row['class_name']}\n".encode())
        digests[name] = digest.hexdigest()[:16]
    return digests


def remove_stale_images(out, records, stamps, targets):
    """Delete prepared images whose source changed since they were made (an edited photo or crop box,
    another file under the same name, a name now given to another file), so they are decoded again.
    A copy of before sources.csv has only its files' times: an image older than its source is
    redone, and so is the file at the plain name of a source now renamed to avoid a collision (an
    earlier version wrote both sources there)."""
    if (out / "sources.csv").exists():
        now = {(targets[i], *map(str, stamp)) for i, stamp in stamps.items()}
        for row in read_csv(out / "sources.csv", SOURCE_FIELDS):
            if tuple(row[k] or "" for k in SOURCE_FIELDS) not in now:
                (out / "images" / row["path"]).unlink(missing_ok=True)
        return
    for record in records:
        plain = prepared_relative_path(record.path)
        if targets[record.image_id] != plain:
            (out / "images" / plain).unlink(missing_ok=True)
    for image_id, (_, _, mtime, _) in stamps.items():
        target = out / "images" / targets[image_id]
        with contextlib.suppress(OSError):
            if target.stat().st_mtime_ns < mtime:
                target.unlink()


def moved_between_splits(out, splits, targets):
    """Prepared images that a previous preparation put in another split ("images/x.jpg: train -> test")."""
    before = {}
    for name in SPLITS:
        if (out / f"{name}.csv").exists():
            before.update({row["path"]: name for row in read_csv(out / f"{name}.csv", ["path"])})
    now = {f"images/{targets[r.image_id]}": name for name in SPLITS for r in splits[name]}
    return [f"{path}: {before[path]} -> {name}" for path, name in now.items() if before.get(path, name) != name]


def check_same_splits(recorded, prepared, run_dir, doing):
    """Refuse to resume or evaluate a run whose training or validation images are not the ones of
    ``prepared`` now (prepare_data run again on changed images, or --data-dir on other data):
    images it trained on may be test images there. ``recorded``: the run's config["dataset"]
    (runs of before this record carry no digests and are not checked)."""
    then = (recorded or {}).get("splits")
    if not isinstance(then, dict):
        return
    now = training_digests(prepared)
    changed = [name for name in ("train", "val") if then.get(name) and then[name] != now[name]]
    if changed:
        raise UserError(f"{prepared}: its {' and '.join(changed)} split is not the one {run_dir} trained on "
                        f"(prepare_data.py ran again on changed images, or --data-dir points at other data), so "
                        f"{doing} would mix the two: images it trained on may now be test images; train it again "
                        f"with --force, or prepare the new images into another --data-dir")


def check_run_splits(run_dir, prepared, doing):
    """``check_same_splits`` for the run in ``run_dir``, from the digests its config.json records."""
    config = Path(run_dir) / "config.json"
    if config.exists():
        check_same_splits(read_config(config).get("dataset"), prepared, run_dir, doing)
