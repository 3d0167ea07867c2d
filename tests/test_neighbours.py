"""The one nearest-neighbour routine, against a brute-force stable sort, ties and -0.0 included."""
import numpy as np
import pytest

from triplet.deploy.neighbours import normalise, top_k


def brute_force(queries, gallery, k, exclude=None):
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    rows = []
    for q, row in enumerate(sims):
        candidates = [j for j in range(len(gallery)) if exclude is None or j != exclude[q]]
        rows.append(sorted(candidates, key=lambda j: (-row[j], j))[:k])
    return np.array(rows)


@pytest.mark.parametrize("k", [1, 3, 7, 19, 20])
def test_many_exact_ties_rank_by_index(k):
    # Entries +-0.5 in 4-D: every similarity is one of -1, -0.5, 0, 0.5, 1, so most rows tie
    # across the k-th place; the -0.0 that a product can give must tie with +0.0.
    rng = np.random.default_rng(0)
    gallery = normalise(rng.choice([-1.0, 1.0], size=(20, 4)))
    queries = normalise(rng.choice([-1.0, 1.0], size=(9, 4)))
    indices, sims = top_k(queries, gallery, k, chunk_size=4)
    assert indices.tolist() == brute_force(queries, gallery, k).tolist()
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ gallery.T, indices, axis=1))


def test_exclude_leaves_the_query_out_and_caps_k():
    rng = np.random.default_rng(1)
    x = normalise(rng.normal(size=(30, 8)))
    queries = np.array([0, 7, 29])
    indices, sims = top_k(x[queries], x, 50, exclude=queries)
    assert indices.shape == (3, 29)
    assert indices.tolist() == brute_force(x[queries], x, 29, exclude=queries).tolist()
    assert all(q not in row for q, row in zip(queries, indices))
    assert (np.diff(sims, axis=1) <= 0).all()


def test_orders_by_similarity_then_index():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    indices, sims = top_k(np.array([[1, 0]], np.float32), gallery, k=3)
    assert indices.tolist() == [[0, 2, 3]] and np.allclose(sims, [[1, 1, 0.6]])


def test_collapsed_embeddings_rank_by_index():
    x = np.ones((6, 3), np.float32)
    indices, _ = top_k(x, x, 3, exclude=np.arange(6))
    assert indices.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
