"""Exact top-k (the contract every index follows), and the faiss indexes against it."""
import numpy as np
import pytest

from triplet.deploy import index as index_module
from triplet.deploy.index import KINDS, build_index, index_from_bytes, resolve_kind
from triplet.deploy.neighbours import top_k
from triplet.errors import UserError


def unit(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["exact", "faiss-flat"])
def test_exclude_drops_only_the_given_row_and_minus_one_drops_nothing(kind):
    gallery = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], np.float32)
    queries = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    indices, sims = build_index(kind, gallery).search(queries, 2, exclude=[0, -1, 3])
    assert indices[:2].tolist() == [[2, 4], [0, 2]] and indices[2, 0] == 1  # ties by lower index
    assert indices[2, 1] == 0 or kind != "exact"  # a tie across the k-th place: faiss picks its own
    assert np.allclose(sims, [[1, 1], [1, 1], [1, 0]])
    assert np.array_equal(build_index(kind, gallery).search(queries, 9)[0], top_k(queries, gallery, 5)[0])


def test_resolve_kind_by_gallery_size():
    assert resolve_kind("exact", 10**9) == "exact"
    assert resolve_kind("faiss", 1000) == "faiss-flat"
    assert resolve_kind("faiss", index_module.FLAT_BELOW) == "faiss-hnsw"
    assert resolve_kind("faiss", index_module.IVF_FROM) == "faiss-ivf"
    assert resolve_kind("faiss-ivf", 10) == "faiss-ivf"
    with pytest.raises(UserError, match="--index annoy: unknown"):
        resolve_kind("annoy", 10)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "faiss"])
def test_every_kind_finds_the_exact_neighbours_of_a_clustered_gallery(kind):
    centres = unit(40, d=32, seed=5)  # like real embeddings: classes form clusters
    gallery = centres[np.arange(2000) % 40] + 0.15 * unit(2000, d=32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:50] + 0.01 * unit(50, d=32, seed=3)  # each query sits next to one gallery row
    exact, _ = top_k(queries, gallery, 5)
    index = build_index(kind, gallery)
    assert index.kind == kind and len(index) == 2000
    indices, sims = index.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(indices.tolist(), exact.tolist())])
    assert indices[:, 0].tolist() == list(range(50))
    assert recall >= (1.0 if kind in ("exact", "faiss-flat") else 0.9)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    without_self, _ = index.search(queries, 5, exclude=np.arange(50))
    assert not (without_self == np.arange(50)[:, None]).any() and without_self.shape == (50, 5)


@pytest.mark.parametrize("kind", ["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"])
def test_saved_index_reloads_and_grows_incrementally(kind):
    gallery = unit(1200, d=32)
    index = build_index(kind, gallery[:1000])
    again = index_from_bytes(kind, index.to_bytes(), 32)
    assert len(again) == 1000
    assert np.array_equal(again.search(gallery[:20], 3)[0], index.search(gallery[:20], 3)[0])
    again.add(gallery[1000:])
    assert len(again) == 1200 and again.search(gallery[1100:1110], 1)[0][:, 0].tolist() == list(range(1100, 1110))


def test_faiss_missing_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        build_index("faiss-flat", unit(10))
