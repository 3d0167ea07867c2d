"""A searchable gallery: a folder of images, embedded once, cached outside it, and indexed.

Real photo folders hold broken downloads, text files named .jpg, and symlinks to anywhere: an
unreadable file is skipped with a warning (never fatal), and a symlink is followed only when it
leads to a file inside the gallery. The cache never writes into the user's folder: it lives in
``$XDG_CACHE_HOME/triplet`` (``~/.cache/triplet``) unless ``--cache`` says otherwise, one file per
(model, gallery folder). Embeddings are keyed by file contents (SHA-256), so a renamed or
moved photo is not embedded again; a file's size and modification time only spare re-hashing.
The index (``triplet.deploy.index``) is saved beside the cache and reloaded when its files are
unchanged; added images are appended to it without re-embedding or re-indexing the others.
"""
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from triplet.cli import check
from triplet.deploy.index import KINDS, build_index, index_from_bytes, resolve_kind
from triplet.deploy.inference import file_digest
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, open_rgb, preprocess
from triplet.errors import UserError
from triplet.fileio import NPZ_ERRORS, atomic_path



@dataclass
class GalleryOptions:
    """Options that decide which model embeds which gallery, and how it is cached and indexed;
    shared by scripts/search.py and scripts/serve.py."""
    model: str = field(default="", metadata={"required": True, "help": "exported model (scripts/export_onnx.py)"})
    gallery: str = field(default="", metadata={"required": True, "help": "folder of images to search (recursively)"})
    index: str = field(default="exact", metadata={"choices": KINDS, "help": "exact (NumPy) or faiss (by "
                       "gallery size: exact inner product, HNSW, IVF), or a faiss kind by name"})
    cache: str = field(default="", metadata={"help": "folder for the gallery cache and index "
                                             "(default: $XDG_CACHE_HOME/triplet or ~/.cache/triplet)"})
    no_cache: bool = field(default=False, metadata={"help": "embed the gallery afresh and write no cache"})
    batch_size: int = field(default=64, metadata={"help": "images per onnxruntime call while embedding"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse an image with more pixels than this (a decompression bomb; an upload to serve.py gets "
                "413); 64 million passes 50-megapixel photos"})

    def __post_init__(self):
        check(self.model, "--model is required: an ONNX file written by scripts/export_onnx.py")
        check(self.gallery, "--gallery is required: a folder of images")
        check(self.batch_size >= 1, "--batch-size must be >= 1")
        check(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")


def default_cache_dir():
    """``$XDG_CACHE_HOME/triplet``, else ``~/.cache/triplet`` (the XDG base-directory convention)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "triplet"


def gallery_files(folder):
    """Image files under ``folder``, sorted, and the symlinks not followed because they lead outside.

    Symlinked folders are never entered (no loops, no escape); a symlinked file counts only
    when its target lies inside ``folder``.
    """
    root = Path(folder).resolve()
    files, outside = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        outside += [Path(dirpath) / d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_symlink():
                target = path.resolve()
                if not (target.is_relative_to(root) and target.is_file()):
                    outside.append(path)
                    continue
            files.append(path)
    return sorted(files), sorted(outside)


def class_name(rel):
    """The class of a gallery image: its top folder (``class/IMG.jpg``), or None at the top level."""
    parts = Path(rel).parts
    return parts[0] if len(parts) > 1 else None


def embed_readable(embedder, files, batch_size=64, progress=False):
    """Embed ``files``, skipping unreadable ones: ``(embeddings of the readable, ok mask, [(path, why)])``."""
    out, ok, failures = [], np.zeros(len(files), bool), []
    with tqdm(total=len(files), desc="embedding", unit="img", disable=None if progress else True) as bar:  # None: only on a terminal
        for start in range(0, len(files), batch_size):
            arrays = []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    arrays.append(preprocess(open_rgb(files[i], embedder.max_pixels), embedder.image_size, embedder.resize_size,
                                             embedder.metadata["mean"], embedder.metadata["std"], embedder.max_pixels))
                    ok[i] = True
                except (UserError, Image.DecompressionBombError) as e:
                    why = str(e)
                    failures.append((files[i], why if str(files[i]) in why else f"{files[i]}: {why}"))
            if arrays:
                out.append(embedder.run(np.stack(arrays)))
            bar.update(min(batch_size, len(files) - start))
    return (np.concatenate(out) if out else np.empty((0, embedder.embedding_dim), np.float32)), ok, failures


def _load_npz(path):
    """The arrays of a cache file, or {} when it is absent or damaged (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except NPZ_ERRORS:
        return {}


def _cache_fits(cached, model, dim):
    """Whether a loaded cache is this model's and whole: one float32 row of ``dim`` per listed file. A file
    that loads but is cut or mixed up is as damaged as one that does not load (then it is rebuilt)."""
    try:
        embeddings = cached["embeddings"]
        return (str(cached["model"]) == model and embeddings.dtype == np.float32 and embeddings.shape[1:] == (dim,)
                and all(cached[k].shape == (len(embeddings),) for k in ("paths", "sizes", "mtimes", "digests")))
    except KeyError:
        return False


def _save_npz(path, log, **arrays):
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        log(f"note: could not write the cache {path} ({e}); continuing without it")


@dataclass
class Gallery:
    """Gallery images (absolute paths and paths relative to the folder), their embeddings and index."""

    root: Path
    files: list
    rel: list
    embeddings: np.ndarray
    index: object
    rows: np.ndarray  # gallery position of each index row
    skipped: list = field(default_factory=list)  # [(path, reason)]
    outside: list = field(default_factory=list)  # symlinks not followed

    def __len__(self):
        return len(self.files)

    def classes(self):
        return [class_name(r) for r in self.rel]

    def search(self, queries, k, exclude=None):
        """Top-k gallery positions and similarities per query; -1 / -inf pad rows an index left short."""
        if exclude is not None:
            position_to_row = np.full(len(self.files), -1, np.int64)
            position_to_row[self.rows] = np.arange(len(self.rows))
            exclude = np.where(np.asarray(exclude) >= 0, position_to_row[np.asarray(exclude)], -1)
        indices, sims = self.index.search(queries, k, exclude)
        return np.where(indices >= 0, self.rows[np.maximum(indices, 0)], -1), sims


def _content_keys(files, rel, previous, log):
    """(size, mtime_ns, SHA-256) of each file; the digest is reused from ``previous`` when size and time match."""
    known = {}
    if previous:
        known = {str(p): (int(s), int(m), str(d)) for p, s, m, d in
                 zip(previous["paths"], previous["sizes"], previous["mtimes"], previous["digests"])}
    keys = []
    for path, r in zip(files, rel):
        stat = path.stat()
        size_time = (stat.st_size, stat.st_mtime_ns)
        cached = known.get(r)
        keys.append((*size_time, cached[2] if cached and cached[:2] == size_time else file_digest(path)))
    return keys


def _saved_index(kind, dim, saved):
    """The saved index and the name of each of its rows, or (None, []) when there is none of this kind or it
    is damaged: bytes faiss cannot read, vectors of another size, a row count that is not its list's."""
    if not saved or str(saved.get("kind")) != kind:
        return None, []
    try:
        index, names = index_from_bytes(kind, saved["index"], dim), [str(d) for d in saved["names"]]
    except (KeyError, ValueError, RuntimeError):  # faiss raises RuntimeError on bytes it cannot read
        return None, []
    return (index, names) if len(index) == len(names) else (None, [])


def _update_index(kind, dim, saved, names, embeddings, log):
    """Reuse the saved index when it covers a subset of today's files, adding only the new ones.

    ``names`` (path and content digest of each image) identify index rows: a removed or changed
    file means a rebuild, since HNSW cannot delete; an added one is only appended.
    """
    index, old = _saved_index(kind, dim, saved)
    position = {d: i for i, d in enumerate(names)}
    if index is not None and all(d in position for d in old):
        rows = [position[d] for d in old]
        new = sorted(set(range(len(names))) - set(rows))
        if new:
            log(f"adding {len(new)} images to the saved {kind} index of {len(rows)}")
            index.add(embeddings[new])
        return index, np.array(rows + new, np.int64), bool(new)
    if len(names) >= 10_000:
        log(f"building a {kind} index of {len(names)} images")
    return build_index(kind, embeddings), np.arange(len(names), dtype=np.int64), True


def load_gallery(embedder, folder, cache_dir=None, index_kind="exact", batch_size=64, progress=False,
                 log=print, use_cache=True):
    """Embed (or reuse) every readable image under ``folder`` and index it; returns a ``Gallery``."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--gallery {folder}: folder not found")
    files, outside = gallery_files(root)
    for link in outside:
        why = "symlinked folders are never entered (no loops)" if link.is_dir() else "a symlink leading outside the gallery"
        log(f"warning: not following {link}: {why}")
    if not files:
        raise UserError(f"--gallery {folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    root = root.resolve()
    rel = [f.relative_to(root).as_posix() for f in files]
    model = file_digest(embedder.path)
    stem = f"gallery-{model}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_path = cache_dir / f"{stem}.npz"
    cached = _load_npz(cache_path) if use_cache else {}
    if cached and not _cache_fits(cached, model, embedder.embedding_dim):
        cached = {}
    keys = _content_keys(files, rel, cached, log)
    digests = [k[2] for k in keys]
    by_digest = dict(zip((str(d) for d in cached.get("digests", [])), cached.get("embeddings", [])))
    todo = [i for i, d in enumerate(digests) if d not in by_digest]
    embeddings = np.empty((len(files), embedder.embedding_dim), np.float32)
    for i, d in enumerate(digests):
        if d in by_digest:
            embeddings[i] = by_digest[d]
    ok = np.ones(len(files), bool)
    skipped = []
    if todo:
        log(f"embedding {len(todo)} of {len(files)} gallery images ({len(files) - len(todo)} cached)")
        fresh, fresh_ok, skipped = embed_readable(embedder, [files[i] for i in todo], batch_size, progress)
        todo = np.array(todo)
        embeddings[todo[fresh_ok]] = fresh
        ok[todo[~fresh_ok]] = False
        for _, why in skipped:
            log(f"warning: skipped {why}")
        if skipped:
            log(f"skipped {len(skipped)} unreadable of {len(files)} gallery files")
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        raise UserError(f"--gallery {folder}: none of its {len(files)} image files could be read")
    files, rel = [files[i] for i in keep], [rel[i] for i in keep]
    keys, digests, embeddings = [keys[i] for i in keep], [digests[i] for i in keep], embeddings[keep]
    changed = len(todo) > 0 or len(cached.get("paths", [])) != len(files) or \
        [str(p) for p in cached.get("paths", [])] != rel
    if use_cache and changed:
        _save_npz(cache_path, log, model=np.array(model), folder=np.array(str(root)), paths=np.array(rel),
                  sizes=np.array([k[0] for k in keys], np.int64), mtimes=np.array([k[1] for k in keys], np.int64),
                  digests=np.array(digests), embeddings=embeddings)
    kind = resolve_kind(index_kind, len(files))
    index_path = cache_dir / f"{stem}.{kind}.npz"
    saved = _load_npz(index_path) if use_cache and kind != "exact" else {}
    names = [f"{r}\t{d}" for r, d in zip(rel, digests)]
    index, rows, index_changed = _update_index(kind, embedder.embedding_dim, saved, names, embeddings, log)
    if use_cache and kind != "exact" and index_changed:
        _save_npz(index_path, log, kind=np.array(kind), names=np.array([names[r] for r in rows]),
                  index=np.asarray(index.to_bytes(), np.uint8))
    return Gallery(root, files, rel, embeddings, index, rows, skipped, outside)


