"""Gallery indexes: exact NumPy search, or faiss (exact inner product, HNSW or IVF) for big galleries.

All kinds share one small interface, so scripts/search.py and scripts/serve.py never care which
one answers: ``add(vectors)``, ``search(queries, k, exclude=None) -> (indices, similarities)``
in the contract of ``triplet.deploy.neighbours.top_k`` (approximate kinds may miss a true
neighbour, ``scripts/benchmark_search.py`` measures how often; faiss settles a tie across the
k-th place its own way, ties inside the k are ordered by index), and ``to_bytes``/``from_bytes``
so an index is saved beside the gallery cache and reloaded instead of rebuilt. Embeddings are
unit vectors, so the inner product is the cosine similarity.

``--index faiss`` picks by gallery size: below ``FLAT_BELOW`` vectors exact search costs
well under a millisecond per query, so it stays exact (``IndexFlatIP``); up to ``IVF_FROM``,
HNSW (a graph: the fastest queries, more memory, slower to build); beyond, IVF (coarse
clusters: quick to build and smaller, its recall set by ``nprobe``).

A few queries run on one thread: their work is too small to share out, and on a busy machine
a BLAS or OpenMP worker thread that is not scheduled stalls the whole call (docs/deploy.md has
the measured difference); batches keep every thread.
"""
import contextlib
import functools

import numpy as np

from triplet.deploy.neighbours import top_k
from triplet.errors import UserError

KINDS = ("exact", "faiss", "faiss-flat", "faiss-hnsw", "faiss-ivf")
FLAT_BELOW = 50_000
IVF_FROM = 5_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
IVF_NPROBE_SHARE = 1 / 16  # of the lists probed per query
FEW_QUERIES = 8


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


@contextlib.contextmanager
def one_thread_for_few(n_queries, faiss=None):
    """Limit BLAS (and faiss's OpenMP) to one thread while searching ``n_queries`` <= FEW_QUERIES."""
    if n_queries > FEW_QUERIES:
        yield
        return
    threads = faiss.omp_get_max_threads() if faiss else None
    if faiss:
        faiss.omp_set_num_threads(1)
    try:
        with _blas_controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        if faiss:
            faiss.omp_set_num_threads(threads)


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("--index faiss needs faiss-cpu: pip install faiss-cpu (see requirements.txt)") from e
    return faiss


def resolve_kind(kind, size):
    """``faiss`` -> the concrete faiss kind for a gallery of ``size`` vectors; others unchanged."""
    if kind not in KINDS:
        raise UserError(f"--index {kind}: unknown; choose one of {', '.join(KINDS)}")
    if kind != "faiss":
        return kind
    return "faiss-flat" if size < FLAT_BELOW else "faiss-hnsw" if size < IVF_FROM else "faiss-ivf"


def _drop_excluded(indices, sims, exclude, k):
    """Rows of ``k + 1`` results -> ``k`` results without each query's excluded index."""
    keep = indices != np.asarray(exclude)[:, None]
    keep &= np.cumsum(keep, axis=1) <= k
    out_i = np.full((len(indices), k), -1, np.int64)
    out_s = np.full((len(indices), k), -np.inf, np.float32)
    for r in range(len(indices)):
        row = np.flatnonzero(keep[r])
        out_i[r, :len(row)], out_s[r, :len(row)] = indices[r, row], sims[r, row]
    return out_i, out_s


class ExactIndex:
    """Every query against every gallery vector, in NumPy: exact, and fast for small galleries."""

    kind = "exact"

    def __init__(self, dim):
        self.dim = dim
        self.vectors = np.empty((0, dim), np.float32)

    def __len__(self):
        return len(self.vectors)

    def add(self, vectors):
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32).reshape(-1, self.dim)])

    def search(self, queries, k, exclude=None):
        k = max(0, min(int(k), len(self) - (exclude is not None)))
        with one_thread_for_few(len(queries)):
            indices, sims = top_k(queries, self.vectors, k + (exclude is not None))
        if exclude is not None:  # as faiss: one more, then drop it; -1 excludes nothing
            indices, sims = _drop_excluded(indices, sims, exclude, k)
        return indices, sims

    def to_bytes(self):
        return np.ascontiguousarray(self.vectors).view(np.uint8).ravel()

    @classmethod
    def from_bytes(cls, data, dim):
        index = cls(dim)
        index.vectors = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32).reshape(-1, dim).copy()
        return index


class FaissIndex:
    """A faiss inner-product index of one kind: flat (exact), HNSW or IVF (approximate)."""

    def __init__(self, kind, dim, faiss_index=None):
        self.kind, self.dim = kind, dim
        self.faiss = _faiss()
        self.index = faiss_index
        if faiss_index is None and kind == "faiss-flat":
            self.index = self.faiss.IndexFlatIP(dim)
        elif faiss_index is None and kind == "faiss-hnsw":
            self.index = self.faiss.IndexHNSWFlat(dim, HNSW_M, self.faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.set_search_effort()

    def __len__(self):
        return 0 if self.index is None else self.index.ntotal

    def set_search_effort(self, ef_search=HNSW_EF_SEARCH, nprobe_share=IVF_NPROBE_SHARE):
        """How hard an approximate index looks: more is slower and finds more true neighbours."""
        if self.kind == "faiss-hnsw":
            self.index.hnsw.efSearch = ef_search
        elif self.kind == "faiss-ivf" and self.index is not None:
            self.index.nprobe = max(1, int(round(self.index.nlist * nprobe_share)))

    def _train_ivf(self, vectors):
        """IVF needs its coarse clusters first: sqrt(N) lists (quick to assign), trained on a seeded sample."""
        nlist = max(1, min(int(np.sqrt(len(vectors))), len(vectors) // 39))
        quantizer = self.faiss.IndexFlatIP(self.dim)
        self.index = self.faiss.IndexIVFFlat(quantizer, self.dim, nlist, self.faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(vectors))[:nlist * 64]
        self.index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        self.set_search_effort()

    def add(self, vectors):
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(-1, self.dim)
        if self.index is None:
            if len(vectors) == 0:
                return
            self._train_ivf(vectors)
        self.index.add(vectors)

    def search(self, queries, k, exclude=None):
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dim)
        k = max(0, min(int(k), len(self) - (exclude is not None)))
        if k == 0:
            return np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        with one_thread_for_few(len(queries), self.faiss):
            sims, indices = self.index.search(queries, k + (exclude is not None))
        order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -sims), axis=-1)
        indices, sims = np.take_along_axis(indices, order, 1), np.take_along_axis(sims, order, 1)
        if exclude is not None:
            indices, sims = _drop_excluded(indices, sims, exclude, k)
        return indices.astype(np.int64), sims.astype(np.float32)

    def to_bytes(self):
        return self.faiss.serialize_index(self.index)

    @classmethod
    def from_bytes(cls, kind, data, dim):
        index = _faiss().deserialize_index(np.asarray(data, np.uint8))
        if index.d != dim:
            raise ValueError(f"a saved index of {index.d}-d vectors, not {dim}-d")
        return cls(kind, dim, index)


def new_index(kind, dim):
    """An empty index of a concrete kind (``resolve_kind`` first for ``faiss``)."""
    return ExactIndex(dim) if kind == "exact" else FaissIndex(kind, dim)


def build_index(kind, vectors):
    """``kind`` (any of KINDS) over ``vectors`` (N x D unit rows)."""
    vectors = np.asarray(vectors, np.float32)
    index = new_index(resolve_kind(kind, len(vectors)), vectors.shape[1])
    index.add(vectors)
    return index


def index_from_bytes(kind, data, dim):
    return ExactIndex.from_bytes(data, dim) if kind == "exact" else FaissIndex.from_bytes(kind, data, dim)
