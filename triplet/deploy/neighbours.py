"""Exact nearest neighbours by cosine similarity, in NumPy only: one routine for every caller.

Evaluation metrics, the retrieval figure and gallery search all rank a gallery for each query by
the inner product of L2-normalised embeddings, most similar first, ties broken by the lower
gallery index, so every ranking is deterministic and the three can never disagree. Queries are
processed in chunks, so memory is a ``chunk_size x N`` block, never ``N x N``.
"""
import numpy as np


def normalise(x):
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_k_rows(sims, k):
    """Column indices of the k largest values of each row, by (value desc, index asc), exactly.

    ``argpartition`` finds each row's k-th value v; the top-k set is every column above v plus
    the lowest-index columns equal to v, so ties across the k-th place are settled by index.
    """
    if k >= sims.shape[1]:
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, part, axis=1).min(axis=1)[:, None]
    take = sims >= kth
    tied = take.sum(axis=1) > k
    if tied.any():
        equal = sims[tied] == kth[tied]
        above = sims[tied] > kth[tied]
        need = k - above.sum(axis=1, keepdims=True)
        take[tied] = above | (equal & (np.cumsum(equal, axis=1, dtype=np.int32) <= need))
    columns = np.nonzero(take)[1].reshape(len(sims), k)  # each row's k columns, in index order
    order = np.argsort(-np.take_along_axis(sims, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def top_k(queries, gallery, k, exclude=None, chunk_size=1024):
    """The ``k`` gallery rows most similar to each query: ``(indices, similarities)``, both Q x k.

    ``queries`` and ``gallery`` are expected L2-normalised (``normalise``), so the inner product
    is the cosine similarity. ``exclude``: one gallery index per query that is never returned
    (the query itself, in leave-one-out retrieval). ``k`` is capped at what the gallery holds.
    """
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    k = max(0, min(k, len(gallery) - (exclude is not None)))
    indices = np.empty((len(queries), k), np.int64)
    similarities = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        sims = queries[start:stop] @ gallery.T + np.float32(0.0)  # + 0.0: -0.0 ties with +0.0
        if exclude is not None:
            sims[np.arange(stop - start), np.asarray(exclude)[start:stop]] = -np.inf
        if k:
            idx = _top_k_rows(sims, k)
            indices[start:stop] = idx
            similarities[start:stop] = np.take_along_axis(sims, idx, axis=1)
    return indices, similarities
