"""scripts/search.py over real-photo-folder trouble: broken files, symlinks, the cache outside, output forms."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import call_script, copy_gallery, run_script
from triplet.deploy.gallery import default_cache_dir, gallery_files, load_gallery
from triplet.deploy.inference import OnnxEmbedder


@pytest.fixture
def gallery(test_images, tmp_path):
    return copy_gallery(test_images[:12], tmp_path / "gallery")


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """XDG_CACHE_HOME in a temporary folder: the default cache lands in cache_home/triplet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def search(model_path, gallery, query, *extra):
    status, out = call_script("search", "--model", model_path, "--gallery", gallery, "--query", query,
                              "--top-k", 3, "--no-progress", *extra)
    assert status == 0, out
    return out


def first_json(text):
    """The JSON document in a script's output (call_script joins stdout and stderr)."""
    return json.JSONDecoder().raw_decode(text, text.index("{"))[0]


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "triplet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "triplet"


def test_search_without_torch_caches_outside_the_gallery(model_path, gallery, tmp_path):
    query = sorted(gallery.rglob("*.jpg"))[5]
    blocker = tmp_path / "blocker"  # scripts/search.py must not need torch
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not available in deployment')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = run_script("search", "--model", model_path, "--gallery", gallery, "--query", query, "--top-k", 3, env=env)
    assert "embedding 12 of 12" in result.stderr
    first = result.stdout.splitlines()[1].split()
    assert first[0] == "1." and float(first[1]) > 0.9999 and first[2] == query.relative_to(gallery).as_posix()
    assert sorted(p.name for p in gallery.rglob("*") if p.is_file()) == sorted(p.name for p in gallery.rglob("*.jpg"))
    assert len(list((tmp_path / "xdg" / "triplet").glob("gallery-*.npz"))) == 1


def test_cache_is_keyed_by_contents_and_grows_incrementally(model_path, gallery, cache_home):
    query = sorted(gallery.rglob("*.jpg"))[5]
    assert "embedding 12 of 12" in search(model_path, gallery, query)
    assert "embedding" not in search(model_path, gallery, query)  # all cached
    moved = sorted(gallery.rglob("*.jpg"))[0]
    moved.rename(moved.with_name("renamed.jpg"))  # same contents, new name: nothing to embed
    assert "embedding" not in search(model_path, gallery, query)
    (gallery / "new").mkdir()
    (gallery / "new" / "copy.jpg").write_bytes(query.read_bytes())  # known contents: nothing to embed
    out = search(model_path, gallery, query)
    assert "embedding" not in out and "new/copy.jpg" in out
    Image.new("RGB", (40, 40), (200, 10, 10)).save(gallery / "new" / "red.jpg")
    assert "embedding 1 of 14" in search(model_path, gallery, query)
    cache, = (cache_home / "triplet").glob("gallery-*.npz")
    with np.load(cache) as data:
        assert len(data["paths"]) == 14 and len(set(data["digests"].tolist())) == 13
    cache.write_bytes(b"damaged")  # a damaged cache is rebuilt, not fatal
    assert "embedding 14 of 14" in search(model_path, gallery, query)
    cache.write_bytes(cache.read_bytes()[:300])  # a truncated zip: BadZipFile, which is no OSError
    assert "embedding 14 of 14" in search(model_path, gallery, query)


@pytest.mark.parametrize("damage", ["columns", "rows"])
def test_a_cache_that_loads_but_does_not_fit_is_rebuilt(model_path, gallery, cache_home, damage):
    """Embeddings cut to 64 columns once failed every later search (could not broadcast (64,) into (128,))."""
    query = sorted(gallery.rglob("*.jpg"))[0]
    search(model_path, gallery, query)
    cache, = (cache_home / "triplet").glob("gallery-*.npz")
    with np.load(cache) as data:
        arrays = dict(data)
    arrays["embeddings"] = arrays["embeddings"][:, :64] if damage == "columns" else arrays["embeddings"][:5]
    np.savez(cache, **arrays)
    assert "embedding 12 of 12" in search(model_path, gallery, query)
    assert "embedding" not in search(model_path, gallery, query)  # the rebuilt cache is used


@pytest.mark.parametrize("damage", ["truncated", "rows"])
def test_a_damaged_saved_index_is_rebuilt(model_path, gallery, cache_home, damage):
    query = sorted(gallery.rglob("*.jpg"))[3]
    search(model_path, gallery, query, "--index", "faiss-flat")
    index_file, = (cache_home / "triplet").glob("gallery-*.faiss-flat.npz")
    with np.load(index_file) as data:
        arrays = dict(data)
    if damage == "truncated":  # faiss cannot read it (RuntimeError)
        arrays["index"] = arrays["index"][:100]
    else:  # fewer names than rows: the rows would be appended again
        arrays["names"] = arrays["names"][:6]
    np.savez(index_file, **arrays)
    out = search(model_path, gallery, query, "--index", "faiss-flat", "--json")
    matches = first_json(out)["results"][0]["matches"]
    assert "adding" not in out and matches[0]["path"] == query.relative_to(gallery).as_posix()
    with np.load(index_file) as data:
        assert len(data["names"]) == 12


def test_cache_and_no_cache_options(model_path, gallery, cache_home, tmp_path):
    query = sorted(gallery.rglob("*.jpg"))[0]
    search(model_path, gallery, query, "--no-cache")
    assert not cache_home.exists()
    search(model_path, gallery, query, "--cache", tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("gallery-*.npz"))) == 1 and not cache_home.exists()


def test_saved_faiss_index_is_reloaded_then_extended(model_path, gallery, cache_home):
    query = sorted(gallery.rglob("*.jpg"))[3]
    out = search(model_path, gallery, query, "--index", "faiss-hnsw")
    assert f"1. 1.0000  {query.relative_to(gallery).as_posix()}" in out
    index_file, = (cache_home / "triplet").glob("gallery-*.faiss-hnsw.npz")
    stamp = index_file.stat().st_mtime_ns
    assert "adding" not in search(model_path, gallery, query, "--index", "faiss-hnsw")
    assert index_file.stat().st_mtime_ns == stamp  # reloaded, not rebuilt
    Image.new("RGB", (40, 40), (10, 200, 10)).save(gallery / "green.jpg")
    out = search(model_path, gallery, gallery / "green.jpg", "--index", "faiss-hnsw")
    assert "adding 1 images to the saved faiss-hnsw index of 12" in out and "1. 1.0000  green.jpg" in out
    (gallery / "green.jpg").unlink()  # a removed file: HNSW cannot delete, so the index is rebuilt
    out = search(model_path, gallery, query, "--index", "faiss-hnsw")
    assert "adding" not in out and f"1. 1.0000  {query.relative_to(gallery).as_posix()}" in out


def test_unreadable_files_are_skipped_with_a_warning_and_a_count(model_path, gallery, cache_home):
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (gallery / "notes.jpg").write_text("a text file named .jpg\n")
    good = sorted(gallery.rglob("*.jpg"))[0].read_bytes()
    (gallery / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (gallery / "readme.txt").write_text("not an image at all: never listed\n")
    query = sorted(gallery.glob("*/*.jpg"))[-1]
    status, out = call_script("search", "--model", model_path, "--gallery", gallery, "--query", query,
                              "--top-k", 20, "--json", "--no-progress")
    assert status == 0, out
    assert "skipped 3 unreadable of 15 gallery files" in out
    assert all(f"warning: skipped {gallery / name}" in out for name in ("broken.jpg", "notes.jpg", "truncated.jpg"))
    result = first_json(out)
    assert result["gallery_size"] == 12 and len(result["skipped"]) == 3
    assert len(result["results"][0]["matches"]) == 12


def test_gallery_of_only_broken_files_is_one_line_error(model_path, tmp_path, cache_home):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.jpg").write_bytes(b"junk")
    status, out = call_script("search", "--model", model_path, "--gallery", tmp_path / "g",
                              "--query", tmp_path / "g" / "a.jpg", "--no-progress")
    assert status == 2 and "a.jpg: not a readable image" in out  # the query itself is checked first


def test_symlinks_leading_outside_are_not_followed(test_images, tmp_path):
    gallery = copy_gallery(test_images[:3], tmp_path / "gallery")
    outside = copy_gallery(test_images[3:5], tmp_path / "outside")
    inside_file = sorted(gallery.rglob("*.jpg"))[0]
    (gallery / "link-inside.jpg").symlink_to(inside_file)
    (gallery / "link-outside.jpg").symlink_to(sorted(outside.rglob("*.jpg"))[0])
    (gallery / "linked-folder").symlink_to(outside, target_is_directory=True)
    (gallery / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    files, refused = gallery_files(gallery)
    real = [f.name for f in gallery.rglob("*.jpg") if not f.is_symlink() and "linked-folder" not in f.parts]
    assert sorted(f.name for f in files) == sorted(real + ["link-inside.jpg"]) and files == sorted(files)
    assert sorted(p.name for p in refused) == ["dangling.jpg", "link-outside.jpg", "linked-folder"]
    assert all(f.resolve().is_relative_to(gallery.resolve()) for f in files)


def test_exclude_self_json_and_grid(model_path, gallery, cache_home, tmp_path):
    query = sorted(gallery.rglob("*.jpg"))[4]
    rel = query.relative_to(gallery).as_posix()
    grid = tmp_path / "out" / "hits.png"
    out = search(model_path, gallery, query, "--json", "--exclude-self", "--grid", grid)
    result = first_json(out)
    matches = result["results"][0]["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3] and rel not in [m["path"] for m in matches]
    assert matches[0]["class"] == matches[0]["path"].split("/")[0]
    assert matches[0]["score"] >= matches[1]["score"] >= matches[2]["score"]
    with Image.open(grid) as picture:  # one row: the query and its 3 matches, 160 px cells
        assert picture.size == (8 + 4 * 168, 8 + 160 + 36 + 8)
    plain = search(model_path, gallery, query)
    assert f"1. 1.0000  {rel}" in plain


def test_gallery_search_maps_index_rows_to_gallery_positions(model_path, gallery, tmp_path):
    """After incremental adds, index row order differs from the sorted file order; results must not."""
    embedder = OnnxEmbedder(model_path)
    cache = tmp_path / "cache"
    late = sorted(gallery.rglob("*.jpg"))[0]
    held = tmp_path / "held.jpg"
    late.rename(held)
    load_gallery(embedder, gallery, cache, "faiss-flat", log=lambda m: None)
    held.rename(late)  # comes back first in sorted order but last in the index
    messages = []
    loaded = load_gallery(embedder, gallery, cache, "faiss-flat", log=messages.append)
    assert any("adding 1 images" in m for m in messages) and loaded.rows.tolist()[-1] == 0
    indices, sims = loaded.search(loaded.embeddings, 1)
    assert indices[:, 0].tolist() == list(range(len(loaded))) and np.allclose(sims[:, 0], 1, atol=1e-5)
    indices, _ = loaded.search(loaded.embeddings, 1, exclude=np.arange(len(loaded)))
    assert (indices[:, 0] != np.arange(len(loaded))).all()


def test_a_gallery_takes_the_same_files_as_a_photo_folder(tmp_path):
    """prepare_data read .tif/.tiff photos that search's gallery silently left out."""
    from triplet.data.sources import _is_listed_image
    from triplet.deploy.preprocess import IMAGE_EXTENSIONS

    for suffix in IMAGE_EXTENSIONS + (".TIFF", ".gif", ".txt"):
        (tmp_path / f"photo{suffix}").write_bytes(b"x")
    files, _ = gallery_files(tmp_path)
    names = sorted(p.name for p in files)
    assert names == sorted(f"photo{s}" for s in IMAGE_EXTENSIONS + (".TIFF",))
    assert all(_is_listed_image(tmp_path / name, tmp_path) for name in names)


def test_a_link_back_to_the_gallery_is_not_called_outside(model_path, gallery, cache_home):
    (gallery / "loop").symlink_to(gallery, target_is_directory=True)
    out = search(model_path, gallery, sorted(gallery.rglob("*.jpg"))[0])
    assert "loop: symlinked folders are never entered (no loops)" in out and "leading outside" not in out
