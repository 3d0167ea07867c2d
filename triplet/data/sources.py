"""Where a dataset's images come from: CUB's layout, a folder of class subfolders, or a CSV.

Each adapter returns a ``Dataset``: records in CUB's ``Record`` form (``path`` is where the image
goes inside the prepared ``images/`` folder), the source file of each, and, for a manifest with a
split column, the splits it fixes. ``triplet.data.prepare`` then decodes, splits and writes the
same prepared folder for all of them, so training and everything after it never see the
difference. The sources are only read.
"""
import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from triplet.data import cub
from triplet.deploy.preprocess import IMAGE_EXTENSIONS
from triplet.errors import UserError

MANIFEST_SPLITS = ("train", "val", "test", "query", "gallery")
KINDS = ("cub", "synthetic", "digits", "folder", "manifest")


@dataclass
class Dataset:
    name: str
    kind: str                                   # one of KINDS
    location: str                               # the folder or CSV it was read from
    records: list                               # cub.Record, path relative to the prepared images/
    files: dict                                 # image_id -> source file
    splits: dict = None                         # {"train", "val", "test"} image ids fixed by a manifest
    roles: dict = field(default_factory=dict)   # image_id -> "query" or "gallery"
    lines: dict = field(default_factory=dict)   # image_id -> "file.csv:line" of a manifest's row

    def info(self):
        return {"name": self.name, "kind": self.kind, "source": str(Path(self.location).resolve())}

    def where(self, image_id):
        """Where the user can find an image: its manifest line, else its file."""
        return self.lines.get(image_id) or str(self.files[image_id])


def cub_kind(root):
    """cub, or synthetic/digits for a set written by ``triplet.data.synthetic`` (its README says so)."""
    from triplet.data.layout import README_MARKER

    readme = Path(root) / "README"
    text = readme.read_text(errors="replace") if readme.is_file() else ""
    if not text.startswith(README_MARKER):
        return "cub"
    return "digits" if "make_digits_cub" in text else "synthetic"


def from_cub(data_dir):
    root = Path(data_dir) / "CUB_200_2011"
    records = cub.read_metadata(root)
    kind = cub_kind(root)
    name = "CUB-200-2011" if kind == "cub" else kind
    return Dataset(name, kind, str(root), records, {r.image_id: root / "images" / r.path for r in records})


def _is_hidden(path, root):
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_listed_image(path, root):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path, root)


def from_image_folder(folder, log=print):
    """``folder/<class>/**/<image>``: one class per subfolder, images at any depth below it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--image-folder {folder}: {'not a folder' if folder.exists() else 'folder not found'}; "
                        f"pass the folder that holds one subfolder per class")
    records, files, skipped = [], {}, Counter()
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        images = []
        for path in (p for p in class_dir.rglob("*") if p.is_file()):
            if _is_listed_image(path, folder):
                images.append(path)
            else:
                skipped["hidden" if _is_hidden(path, folder) else path.suffix.lower() or "no suffix"] += 1
        images.sort()
        if not images:
            log(f"note: {class_dir}: no images (.jpg, .png, ...); not a class")
            continue
        class_id = len({r.class_id for r in records}) + 1
        for path in images:
            records.append(cub.Record(len(records) + 1, path.relative_to(folder).as_posix(), class_id,
                                      class_dir.name, True, None))
            files[len(records)] = path
    if skipped:  # a phone's .heic, say: named, so a class that looks small is explained
        kinds = ", ".join(f"{kind} {count}" for kind, count in skipped.most_common())
        log(f"note: {folder}: {sum(skipped.values())} file(s) in class folders skipped, not images read here "
            f"({kinds}); read: {' '.join(IMAGE_EXTENSIONS)}")
    loose = [p for p in folder.iterdir() if p.is_file() and _is_listed_image(p, folder)]
    if loose:
        log(f"note: {folder}: {len(loose)} image(s) outside class subfolders ignored, e.g. {loose[0].name}")
    if not records:
        raise UserError(f"--image-folder {folder}: no images in class subfolders; expected "
                        f"{folder}/<class name>/<image>.jpg")
    return Dataset(folder.resolve().name, "folder", str(folder), records, files)


def _manifest_rows(path):
    """(line number, row) of a CSV with a path,label[,split] header; errors name the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise UserError(f"{path}:1: header {','.join(header) or '(none)'} lacks "
                                f"{' and '.join(missing)}; expected path,label[,split]")
            twice = [c for c in ("path", "label", "split") if header.count(c) > 1]  # DictReader keeps the last
            if twice:
                raise UserError(f"{path}:1: header {','.join(header)} has the column {twice[0]} twice; "
                                f"keep one {twice[0]} column")
            reader.fieldnames = header
            return [(reader.line_num, row) for row in reader], "split" in header
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--manifest {path}: not a readable CSV file ({e})") from e


def _target(text, image_id):
    """Where a listed image goes in the prepared images/: its own relative path when it is safe."""
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return f"_outside/{image_id}_{path.name}"
    return path.as_posix()


def from_manifest(csv_path):
    """One row per image, ``path,label[,split]``; paths relative to the CSV's folder (or absolute)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"--manifest {csv_path}: file not found")
    rows, has_split = _manifest_rows(csv_path)
    labels = sorted({(row.get("label") or "").strip() for _, row in rows} - {""})
    class_ids = {label: i for i, label in enumerate(labels, start=1)}
    records, files, lines, split_of, roles, seen = [], {}, {}, {}, {}, {}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        text, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        split = (row.get("split") or "").strip().lower()
        if not text or not label:
            raise UserError(f"{where}: needs a path and a label, found {text!r}, {label!r}")
        source = Path(text) if Path(text).is_absolute() else csv_path.parent / text
        if not source.is_file():
            raise UserError(f"{where}: {source}: image file not found")
        if source.resolve() in seen:
            raise UserError(f"{where}: {text} is listed twice (first on line {seen[source.resolve()]})")
        seen[source.resolve()] = line
        if has_split and split not in MANIFEST_SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(MANIFEST_SPLITS)} "
                            f"(leave the column out to split by --split)")
        image_id = len(records) + 1
        records.append(cub.Record(image_id, _target(text, image_id), class_ids[label], label,
                                  split in ("", "train", "val"), None))
        files[image_id] = source
        lines[image_id] = where
        split_of[image_id] = split
        if split in ("query", "gallery"):
            roles[image_id] = split
    if not records:
        raise UserError(f"--manifest {csv_path}: lists no images")
    splits = None
    if has_split:
        splits = {"train": [i for i, s in split_of.items() if s == "train"],
                  "val": [i for i, s in split_of.items() if s == "val"],
                  "test": [i for i, s in split_of.items() if s in ("test", "query", "gallery")]}
        if roles and len(roles) != len(splits["test"]):
            raise UserError(f"{csv_path}: mixes test rows with query/gallery rows; use either test (every "
                            f"image queries all others) or query and gallery")
        if roles and set(roles.values()) != {"query", "gallery"}:
            raise UserError(f"{csv_path}: has {next(iter(set(roles.values())))} rows but no "
                            f"{({'query', 'gallery'} - set(roles.values())).pop()} rows; the protocol needs both")
    return Dataset(csv_path.stem, "manifest", str(csv_path), records, files, splits, roles, lines)


def _test_count(n, fraction):
    """Test images of a class of ``n``: none or at least two, leaving two for training (triplets need pairs)."""
    return 0 if n < 4 or fraction <= 0 else min(n - 2, max(2, round(n * fraction)))


def make_splits(dataset, records, protocol, test_fraction, val_fraction, seed):
    """{"train", "val", "test"} records: the manifest's own split, CUB's, or a seeded one.

    Folder and split-less manifest: ``official`` holds out a stratified ``test_fraction`` of each
    class's images; ``classes`` holds out a ``test_fraction`` of the classes (zero-shot).
    Validation is carved from the training part as for CUB.
    """
    if dataset.kind in ("cub", "synthetic", "digits"):
        return cub.make_splits(records, protocol, val_fraction, seed)
    if dataset.splits is not None:
        kept = {r.image_id: r for r in records}
        fixed = {name: [kept[i] for i in ids if i in kept] for name, ids in dataset.splits.items()}
        if fixed["val"]:
            return fixed
        carved = cub.make_splits(fixed["train"] + fixed["test"], "official", val_fraction, seed)
        return {**carved, "test": fixed["test"]}
    rng = np.random.default_rng([seed, 1])
    class_ids = sorted({r.class_id for r in records})
    if protocol == "classes":
        n_test = min(len(class_ids) - 2, max(2, round(len(class_ids) * test_fraction)))
        if n_test < 2:  # two to train on, two to test on: a triplet's negative is another class
            raise UserError(f"--split classes: needs at least 4 classes (found {len(class_ids)}); use --split official")
        test_classes = {int(c) for c in rng.permutation(class_ids)[:n_test]}
        return cub.make_splits(records, "classes", val_fraction, seed, test_classes)
    test_ids = set()
    for c in class_ids:
        members = [r.image_id for r in records if r.class_id == c]
        test_ids.update(int(i) for i in rng.permutation(members)[:_test_count(len(members), test_fraction)])
    marked = [cub.Record(r.image_id, r.path, r.class_id, r.class_name, r.image_id not in test_ids, r.bbox)
              for r in records]
    return cub.make_splits(marked, "official", val_fraction, seed)
