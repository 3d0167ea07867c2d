"""Writing the CUB-200-2011 layout: a dataset folder from images, and an archive of it.

``write_cub`` lays out ``CUB_200_2011/`` (images/ and the five metadata files) exactly as the
official archive does, so the synthetic sets run through the real extraction, validation and
preparation code; ``pack_archive`` packs such a folder into a deterministic
``CUB_200_2011.tgz`` look-alike for the archive path and its tests.
"""
import gzip
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from triplet.data.cub import md5sum
from triplet.errors import UserError
from triplet.fileio import atomic_path

ROOT = "CUB_200_2011"
README_MARKER = "SYNTHETIC CUB-200-2011"
ARCHIVE_MTIME = 1293840000  # 2011-01-01 UTC: fixed so the same dataset gives the same MD5
JPEG_QUALITY = 90


def _write_text(path, lines):
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.chmod(0o644)


def write_cub(data_dir, class_names, items, readme_lines):
    """Write ``data_dir/CUB_200_2011`` from ``items``: (class index, index in class, image, is_train, box);
    the image is a PIL image or its JPEG bytes.

    The folder is built beside the target and renamed into place, so a crash leaves either the
    old folder or the new one. An existing synthetic folder is replaced; a real one is refused.
    """
    data_dir = Path(data_dir)
    target = data_dir / ROOT
    readme = target / "README"
    if target.exists() and not (readme.is_file() and readme.read_text().startswith(README_MARKER)):
        raise UserError(f"{target} exists and is not a synthetic dataset; refusing to replace it")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{ROOT}.", suffix=".tmp", dir=data_dir))
    try:
        tmp_root.chmod(0o755)
        folders = [f"{k + 1:03d}.{name}" for k, name in enumerate(class_names)]
        for folder in folders:
            (tmp_root / "images" / folder).mkdir(parents=True)
        image_lines, label_lines, split_lines, box_lines = [], [], [], []
        for image_id, (k, i, img, is_train, (x, y, bw, bh)) in enumerate(items, start=1):
            rel = f"{folders[k]}/{class_names[k]}_{i + 1:04d}_{image_id}.jpg"
            if isinstance(img, bytes):  # already encoded (make_synthetic_cub draws in several processes)
                (tmp_root / "images" / rel).write_bytes(img)
            else:
                img.save(tmp_root / "images" / rel, "JPEG", quality=JPEG_QUALITY)
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {k + 1}")
            split_lines.append(f"{image_id} {int(is_train)}")
            box_lines.append(f"{image_id} {float(x)} {float(y)} {float(bw)} {float(bh)}")
        for name, lines in (("classes.txt", [f"{k + 1} {f}" for k, f in enumerate(folders)]),
                            ("images.txt", image_lines), ("image_class_labels.txt", label_lines),
                            ("train_test_split.txt", split_lines), ("bounding_boxes.txt", box_lines)):
            _write_text(tmp_root / name, lines)
        _write_text(tmp_root / "README", [f"{README_MARKER} -- not real bird photographs.", *readme_lines])
        old = None
        if target.exists():
            old = data_dir / f".{ROOT}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp_root, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return target


def _tarinfo(name, path):
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = ARCHIVE_MTIME, 0, 0, "", ""
    mode = path.lstat().st_mode
    if stat.S_ISDIR(mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(mode):
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, path.stat().st_size
    else:
        raise UserError(f"{path}: only regular files and folders can be packed")
    return info


def pack_archive(data_dir, archive_path):
    """Pack ``data_dir/CUB_200_2011`` into a gzip tar like the official CUB_200_2011.tgz.

    Members are sorted and carry fixed times and owners, and the gzip header has no time or
    name, so the same dataset always gives the same bytes. Returns the archive's hex MD5.
    """
    root = Path(data_dir) / ROOT
    if not root.is_dir():
        raise UserError(f"{root}: no such folder to pack")
    members = [(ROOT, root)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root.parent).as_posix()
        for name in sorted(dirnames + filenames):
            members.append((f"{rel}/{name}", Path(dirpath) / name))
    members.sort(key=lambda m: m[0].split("/"))
    with atomic_path(archive_path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, path in members:
            info = _tarinfo(name, path)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return md5sum(archive_path)
