"""Exact nearest neighbours by cosine similarity (inner product of unit vectors), in NumPy only.

One contract for every caller (metrics, plots, search, the server's exact index): the ``k``
most similar gallery rows per query, most similar first, ties broken by the lower gallery
index, so results never depend on the sort algorithm or the chunk size.
"""
import numpy as np

CHUNK_CELLS = 1 << 24  # similarities held at once (64 MB of float32): bounds memory on big galleries


def _top_k_rows(sims, k):
    """Per row of a similarity block: the ``k`` best columns (ties: lower column) and their values."""
    n = sims.shape[1]
    if k >= n:
        order = np.argsort(-sims, axis=1, kind="stable")
        return order, np.take_along_axis(sims, order, axis=1)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, part, axis=1).min(axis=1)
    indices = np.empty((len(sims), k), np.int64)
    for r, (row, threshold) in enumerate(zip(sims, kth)):
        candidates = np.flatnonzero(row >= threshold)  # all strictly better ones plus every tie
        best = candidates[np.lexsort((candidates, -row[candidates]))[:k]]
        indices[r] = best
    return indices, np.take_along_axis(sims, indices, axis=1)


def top_k(queries, gallery, k, exclude=None):
    """The ``k`` gallery rows most similar to each query: ``(indices, similarities)``, Q x k each.

    ``exclude`` (optional, one gallery index per query, -1 for none) drops that row from the
    query's candidates, e.g. the query itself when it is also in the gallery (leave-one-out).
    ``k`` is clipped to the number of candidates left.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"top_k: queries {queries.shape} and gallery {gallery.shape} must be Q x D and N x D")
    k = max(0, min(int(k), len(gallery) - (exclude is not None)))
    if exclude is not None:
        exclude = np.asarray(exclude, np.int64)
        if exclude.shape != (len(queries),):
            raise ValueError(f"top_k: exclude needs one index per query, got shape {exclude.shape}")
    indices = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    if k == 0:
        return indices, sims
    step = max(1, CHUNK_CELLS // max(1, len(gallery)))
    for start in range(0, len(queries), step):
        block = queries[start:start + step] @ gallery.T
        if exclude is not None:
            rows = np.flatnonzero(exclude[start:start + step] >= 0)
            block[rows, exclude[start:start + step][rows]] = -np.inf
        indices[start:start + step], sims[start:start + step] = _top_k_rows(block, k)
    return indices, sims
