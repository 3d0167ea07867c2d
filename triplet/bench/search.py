"""Gallery search speed and recall: exact NumPy against faiss flat, HNSW and IVF (torch-free).

Each index is built from the same seeded unit vectors (or a run's real test embeddings) and
asked the same queries; recall@k is measured against exact search, latency per single query
(p50/p99) and per batch, build time and the index's size as saved.
"""
import os
import time

import numpy as np

from triplet.bench.cpu import cpu_seconds, others_share
from triplet.deploy import index as index_module
from triplet.deploy.index import build_index

HNSW_EF = (32, 64, 128, 256, 512, 1024)
IVF_PROBE_SHARES = (1 / 64, 1 / 16, 1 / 4, 1 / 2)


def unit_vectors(n, dim, seed, chunk=100_000):
    """``n`` seeded random unit vectors, uniform on the sphere (built in chunks to bound memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall_at(found, truth):
    """Mean share of each query's true top-k that an index found (order ignored)."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def time_search(index, queries, k, batch):
    """Per-single-query seconds (each query alone), the results, and the median seconds of a batch call."""
    index.search(queries[:2], k)  # warm-up: thread pools, page faults
    singles, found = np.empty(len(queries)), []
    for i in range(len(queries)):
        start = time.perf_counter()
        found.append(index.search(queries[i:i + 1], k)[0][0])
        singles[i] = time.perf_counter() - start
    batches = []
    for _ in range(3):
        start = time.perf_counter()
        index.search(queries[:batch], k)
        batches.append(time.perf_counter() - start)
    return singles, np.array(found), float(np.median(batches))


def measure(name, index, settings, queries, truth, k, batch, build_s, log):
    """One row of the table: latency, recall and size of ``index`` searched with ``settings``."""
    start, wall = cpu_seconds(), time.perf_counter()
    singles, found, batch_s = time_search(index, queries, k, batch)
    others = others_share(start, cpu_seconds(), time.perf_counter() - wall)
    row = {"index": name, "settings": settings, "build_s": round(build_s, 3),
           "size_mb": round(len(index.to_bytes()) / 2**20, 3),
           "single_p50_ms": round(1e3 * float(np.percentile(singles, 50)), 3),
           "single_p99_ms": round(1e3 * float(np.percentile(singles, 99)), 3),
           "batch_ms": round(1e3 * batch_s, 2), "batch_per_query_ms": round(1e3 * batch_s / min(batch, len(queries)), 3),
           f"recall_at_{k}": round(recall_at(found, truth), 4),
           "others_cpu_share": None if others is None else round(others, 2)}
    log(f"  {name:<11} {settings:<14} build {build_s:7.1f} s  {row['size_mb']:8.1f} MB  single p50 "
        f"{row['single_p50_ms']:8.3f} ms  p99 {row['single_p99_ms']:8.3f} ms  batch/query "
        f"{row['batch_per_query_ms']:7.3f} ms  recall@{k} {row[f'recall_at_{k}']:.3f}")
    return row


def built(kind, vectors):
    start = time.perf_counter()
    index = build_index(kind, vectors)
    return index, time.perf_counter() - start


def benchmark_gallery(gallery, queries, k=10, batch=100, hnsw=True, ivf=True, log=print):
    """Every index kind (and search effort) over one gallery; returns the table's rows."""
    exact, build_s = built("exact", gallery)
    truth = exact.search(queries, k)[0]
    rows = [measure("numpy", exact, "exact", queries, truth, k, batch, build_s, log)]
    flat, build_s = built("faiss-flat", gallery)
    rows.append(measure("faiss-flat", flat, "exact", queries, truth, k, batch, build_s, log))
    del flat
    if hnsw:
        graph, build_s = built("faiss-hnsw", gallery)
        for ef in HNSW_EF:
            graph.set_search_effort(ef_search=ef)
            rows.append(measure("faiss-hnsw", graph, f"M={index_module.HNSW_M} ef={ef}", queries, truth, k,
                                batch, build_s, log))
        del graph
    if ivf:
        lists, build_s = built("faiss-ivf", gallery)
        for share in IVF_PROBE_SHARES:
            lists.set_search_effort(nprobe_share=share)
            rows.append(measure("faiss-ivf", lists, f"nprobe={lists.index.nprobe}/{lists.index.nlist}",
                                queries, truth, k, batch, build_s, log))
    return rows


def best_meeting(rows, k, recall, key="single_p50_ms"):
    """The fastest row reaching ``recall``, or None."""
    good = [r for r in rows if r[f"recall_at_{k}"] >= recall]
    return min(good, key=lambda r: r[key]) if good else None


def load_now():
    return [round(x, 2) for x in os.getloadavg()]
