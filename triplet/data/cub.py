"""CUB-200-2011: download, safe extraction, validation of the metadata, and the splits.

The official archive holds ``CUB_200_2011/`` with five metadata files and
``images/NNN.Class_Name/*.jpg``. Everything here reads those files only through
``read_metadata``, which checks them once and fails with the file and line of the first problem.
"""
import hashlib
import http.client
import math
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from triplet.errors import UserError
from triplet.fileio import read_text

CUB_ARCHIVE = "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_BYTES = 1_150_585_339
# Tried in turn; the MD5 check makes any mirror as trustworthy as the original.
CUB_URLS = [
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
    "https://s3.amazonaws.com/fast-ai-imageclas/CUB_200_2011.tgz",
]
CUB_MEMBERS, CUB_UNPACKED_BYTES = 12_000, 1_200_000_000  # about: 11,788 images, folders, metadata
MAX_MEMBERS, MAX_EXTRACT_BYTES = 50_000, 5_000_000_000  # about four times the real archive
METADATA_FILES = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                  "bounding_boxes.txt"]


def md5sum(path, chunk_size=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path, expected, downloaded=False):
    """Fail when the MD5 of ``path`` is not ``expected``; delete it only if this program downloaded it.

    A bad download is never kept; a user's own file (``--archive``) is never touched.
    """
    actual = md5sum(path)
    if actual != expected.lower():
        if downloaded:
            Path(path).unlink()
            raise UserError(f"{path}: MD5 {actual} does not match the expected {expected}; the download was "
                            f"deleted. Run the command again to download it anew")
        raise UserError(f"{path}: MD5 {actual} does not match the expected {expected}; the file was left "
                        f"untouched. Check --archive and --md5 (pass --md5 {actual} if it is a different "
                        f"archive on purpose)")


def download(dest, urls=CUB_URLS, md5=CUB_MD5, expected_bytes=CUB_BYTES):
    """Download to ``dest`` trying each mirror, resuming a partial ``dest.part`` with HTTP Range."""
    from tqdm import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # server ignored Range: start over
                    have = 0
                total = have + int(response.headers.get("Content-Length") or 0) or expected_bytes
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # .part is kept to resume
            errors.append(f"{url}: {e!r}")
            continue
        if part.stat().st_size < total:  # the connection closed early: keep .part, resume next time
            errors.append(f"{url}: connection closed after {part.stat().st_size:,} of {total:,} bytes")
            continue
        part.replace(dest)
        verify_md5(dest, md5, downloaded=True)
        return dest
    raise UserError(
        f"could not download {dest.name} ({'; '.join(errors)}). Download it by hand from "
        f"{urls[0]} (MD5 {md5}) and run: python scripts/prepare_data.py --archive PATH/{dest.name}")


def _check_member(member, dest):
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts:
        raise UserError(f"archive member {name!r} has an absolute or '..' path; refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"archive member {name!r} is a link or device; refusing to extract")
    if not (dest / name).resolve().is_relative_to(dest.resolve()):
        raise UserError(f"archive member {name!r} would be written outside {dest}; refusing to extract")


def _checked_members(tar, archive, staging, max_members, max_bytes):
    """Every member, checked one by one before anything is written; stops at the first excess."""
    members, total = [], 0
    for member in tar:
        members.append(member)
        total += member.size if member.isfile() else 0
        if len(members) > max_members:
            raise UserError(f"{archive}: holds more than {max_members:,} members (the CUB archive has about "
                            f"{CUB_MEMBERS:,}); refusing to extract. Raise --max-members if you trust it")
        if total > max_bytes:
            raise UserError(f"{archive}: unpacks to more than {max_bytes / 1e9:g} GB (the CUB archive to about "
                            f"{CUB_UNPACKED_BYTES / 1e9:.1f}); refusing to extract. Raise --max-extract-gb if you "
                            f"trust it")
        _check_member(member, staging)
    return members


def safe_extract(archive, data_dir, max_members=MAX_MEMBERS, max_bytes=MAX_EXTRACT_BYTES):
    """Extract a CUB archive into ``data_dir`` after checking every member; all or nothing.

    Members go to a temporary folder inside ``data_dir`` first and ``CUB_200_2011`` is moved into
    place only when the whole archive extracted, so a truncated archive leaves nothing behind.
    Member count and total size are bounded (a small archive can unpack to a full disk).
    """
    archive, data_dir = Path(archive), Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _checked_members(tar, archive, staging, max_members, max_bytes)
                tar.extractall(staging, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{archive}: not a readable gzip tar archive ({e}); "
                            f"download it again") from e
        extracted = staging / "CUB_200_2011"
        if not extracted.is_dir():
            raise UserError(f"{archive}: has no CUB_200_2011/ folder; is it the CUB-200-2011 archive?")
        target = data_dir / "CUB_200_2011"
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Record:
    image_id: int
    path: str          # relative to CUB_200_2011/images
    class_id: int
    class_name: str
    is_train: bool
    bbox: tuple        # x, y, width, height


def _read_table(path, columns, convert):
    """Parse a whitespace-separated metadata file into {id: row}, naming file:line on error."""
    if not path.is_file():
        raise UserError(f"{path}: metadata file missing; the dataset folder is incomplete "
                        f"(re-extract the archive or run `make data`)")
    rows = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1) if columns == 2 else line.split()
        try:
            if len(fields) != columns:
                raise ValueError(f"expected {columns} fields, found {len(fields)}")
            key, value = int(fields[0]), convert(fields[1:])
        except ValueError as e:
            raise UserError(f"{path}:{number}: malformed line {line!r} ({e})") from e
        if key in rows:
            raise UserError(f"{path}:{number}: id {key} appears twice")
        rows[key] = value
    return rows


def _box(fields):
    """x, y, width, height: finite, with a positive size (a box partly outside is clipped when cropping)."""
    box = tuple(float(v) for v in fields)
    if not all(math.isfinite(v) for v in box):
        raise ValueError("a bounding box needs finite numbers")
    if box[2] <= 0 or box[3] <= 0:
        raise ValueError("a bounding box needs a positive width and height")
    return box


def _safe_relative(path_text, where):
    path = PurePosixPath(path_text)
    if path.is_absolute() or ".." in path.parts or "\\" in path_text:
        raise UserError(f"{where}: image path {path_text!r} escapes the dataset folder")
    return path_text


def read_metadata(cub_root, check_files=True):
    """Read and cross-check the five metadata files; return the records sorted by image id."""
    root = Path(cub_root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found; run `make data` (or "
                        f"`python scripts/prepare_data.py --synthetic` for a synthetic set)")
    images = _read_table(root / "images.txt", 2, lambda f: f[0])
    labels = _read_table(root / "image_class_labels.txt", 2, lambda f: int(f[0]))
    split = _read_table(root / "train_test_split.txt", 2, lambda f: int(f[0]))
    classes = _read_table(root / "classes.txt", 2, lambda f: f[0])
    boxes = _read_table(root / "bounding_boxes.txt", 5, _box)
    ids = set(images)
    for name, table in [("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)]:
        if set(table) != ids:
            odd = sorted(set(table) ^ ids)[0]
            # say which file lacks the id: a truncated images.txt is the likelier damage than the other file
            lacks = "images.txt" if odd in table else name
            raise UserError(f"{root / name}: image ids do not match images.txt (first difference: id {odd}, missing "
                            f"from {lacks}); the dataset folder is damaged: extract the archive again")
    records = []
    for image_id in sorted(ids):
        where = f"{root / 'images.txt'} (id {image_id})"
        path = _safe_relative(images[image_id], where)
        class_id = labels[image_id]
        if class_id not in classes:
            raise UserError(f"{root / 'image_class_labels.txt'} (id {image_id}): class {class_id} "
                            f"is not in classes.txt")
        if split[image_id] not in (0, 1):
            raise UserError(f"{root / 'train_test_split.txt'} (id {image_id}): flag must be 0 or 1")
        if check_files and not (root / "images" / path).is_file():
            raise UserError(f"{root / 'images' / path}: image listed in images.txt (id {image_id}) is missing")
        records.append(Record(image_id, path, class_id, classes[class_id], bool(split[image_id]),
                              boxes[image_id]))
    if not records:
        raise UserError(f"{root / 'images.txt'}: lists no images")
    return records


def _carve_count(n, fraction):
    """Validation images (or classes) to carve out of ``n``: two at least, since a triplet needs a pair."""
    if fraction <= 0 or n < 4:
        return 0
    return min(n - 2, max(2, math.ceil(n * fraction)))


def make_splits(records, protocol="official", val_fraction=0.1, seed=0, test_classes=None):
    """Return {"train", "val", "test"} lists of records for one of the two protocols.

    official: CUB's own train_test_split.txt (the study's protocol); validation is a stratified
    share of each class's training images. classes: classes 1-100 train, 101-200 test (the
    zero-shot protocol of the metric-learning literature; by class rank, so any class count
    works; ``test_classes`` names another set); validation is a set of whole held-out training
    classes.
    """
    rng = np.random.default_rng(seed)
    class_ids = sorted({r.class_id for r in records})
    if protocol == "official":
        train = [r for r in records if r.is_train]
        test = [r for r in records if not r.is_train]
        val_ids = set()
        for c in class_ids:
            members = [r.image_id for r in train if r.class_id == c]
            chosen = rng.permutation(members)[:_carve_count(len(members), val_fraction)]
            val_ids.update(int(i) for i in chosen)
        val = [r for r in train if r.image_id in val_ids]
        train = [r for r in train if r.image_id not in val_ids]
    elif protocol == "classes":
        if test_classes is None:
            test_classes = set(class_ids[len(class_ids) // 2:])
        train_classes = [c for c in class_ids if c not in test_classes]
        carve = _carve_count(len(train_classes), val_fraction)
        val_classes = set(int(c) for c in rng.permutation(train_classes)[:carve])
        test = [r for r in records if r.class_id in test_classes]
        val = [r for r in records if r.class_id in val_classes]
        train = [r for r in records if r.class_id not in test_classes and r.class_id not in val_classes]
    else:
        raise UserError(f"--split {protocol!r}: unknown protocol; use 'official' or 'classes'")
    return {"train": train, "val": val, "test": test}
