"""Retrieval and triplet metrics: pure functions of embeddings and labels, all percentages 0-100.

Retrieval uses cosine similarity (embeddings are normalised here), compares every query with all
other images (itself excluded; or, with the query-gallery protocol, with the gallery only) and
ranks them with ``triplet.deploy.neighbours.top_k``, the one nearest-neighbour routine that search
and the figures use too: ties go to the lower gallery index, so results are deterministic, and it
works on chunks of query rows (k = the largest of the requested k and R), so no N x N matrix or
full sort is ever needed. MAP@R and R-Precision follow Musgrave et al., "A Metric Learning Reality
Check" (2020); queries whose class has no other member (R = 0) are left out of those two, but still
count (as misses) in precision@k and recall@k.
"""
import numpy as np
import torch
import torch.nn.functional as F

from triplet.deploy.neighbours import top_k


def _as_float(x):
    """A detached float32 CPU tensor from a NumPy array or a tensor on any device."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def _label_codes(labels):
    """Labels of any type as int64 codes 0..C-1 (one per distinct label)."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    _, codes = np.unique(arr.reshape(-1), return_inverse=True)
    return torch.from_numpy(codes.reshape(-1).astype(np.int64))


def retrieval_metrics(embeddings, labels, ks=(1, 5, 10), recall_ks=(1, 2, 4, 8),
                      chunk_size=1024, with_nmi=True, seed=0, n_init=3, is_query=None):
    """Precision@k, Recall@k, MAP@R, R-Precision (and NMI) of cosine retrieval.

    Leave-one-out by default: every image queries all the others. ``is_query`` (a boolean per
    row) selects the query-gallery protocol instead: the rows marked True are queries, ranked
    against the unmarked rows (the gallery) only. With fewer than k candidates, precision@k
    divides by their number instead of k. Working memory is a chunk_size x N float32 block
    (~250 MB for N = 60,000) and its masks.
    """
    x = F.normalize(_as_float(embeddings), dim=1)
    codes = _label_codes(labels)
    n = x.shape[0]
    if n < 2 or codes.shape[0] != n:
        raise ValueError(f"need >= 2 embeddings and one label each, got {n} and {codes.shape[0]}")
    if is_query is None:
        query_rows = gallery_rows = np.arange(n)
    else:
        mask = np.asarray(is_query, dtype=bool).reshape(-1)
        if mask.shape[0] != n or mask.all() or not mask.any():
            raise ValueError(f"is_query must mark some but not all of the {n} rows")
        query_rows, gallery_rows = np.flatnonzero(mask), np.flatnonzero(~mask)
    leave_one_out = int(is_query is None)  # 1: the query itself is no candidate
    x_np = x.numpy()
    gallery, gallery_codes, query_codes = x_np[gallery_rows], codes[gallery_rows], codes[query_rows]
    candidates = len(gallery_rows) - leave_one_out
    r = torch.bincount(gallery_codes, minlength=int(codes.max()) + 1)[query_codes] - leave_one_out
    kmax = min(candidates, max(*ks, *recall_ks, int(r.max())))
    ranks = torch.arange(1, kmax + 1, dtype=torch.float64)
    prec = {k: 0.0 for k in ks}
    rec = {k: 0.0 for k in recall_ks}
    map_r = r_prec = 0.0
    for start in range(0, len(query_rows), chunk_size):
        stop = min(start + chunk_size, len(query_rows))
        exclude = np.arange(start, stop) if leave_one_out else None
        nearest, _ = top_k(x_np[query_rows[start:stop]], gallery, kmax, exclude=exclude, chunk_size=chunk_size)
        rel = gallery_codes[torch.from_numpy(nearest)] == query_codes[start:stop, None]
        hits = rel.cumsum(1, dtype=torch.float64)
        for k in ks:
            prec[k] += (hits[:, min(k, candidates) - 1] / min(k, candidates)).sum().item()
        for k in recall_ks:
            rec[k] += (hits[:, min(k, candidates) - 1] > 0).sum().item()
        rq = r[start:stop]
        valid = rq > 0
        rq, rel, hits = rq[valid], rel[valid], hits[valid]
        r_prec += (hits.gather(1, (rq - 1)[:, None])[:, 0] / rq).sum().item()
        within = ranks[None, :] <= rq[:, None]
        map_r += ((hits / ranks * (rel & within)).sum(1) / rq).sum().item()
    n_queries, n_valid = len(query_rows), int((r > 0).sum())
    out = {f"precision_at_{k}": 100.0 * v / n_queries for k, v in prec.items()}
    out.update({f"recall_at_{k}": 100.0 * v / n_queries for k, v in rec.items()})
    out["map_at_r"] = 100.0 * map_r / n_valid if n_valid else 0.0
    out["r_precision"] = 100.0 * r_prec / n_valid if n_valid else 0.0
    if with_nmi:
        out["nmi"] = _kmeans_nmi(x_np, codes.numpy(), seed, n_init)
    return {k: float(v) for k, v in out.items()}


def nmi(embeddings, labels, seed=0, n_init=3):
    """NMI (%) between the labels and k-means (one cluster per label) on normalised embeddings."""
    x = F.normalize(_as_float(embeddings), dim=1)
    return _kmeans_nmi(x.numpy(), _label_codes(labels).numpy(), seed, n_init)


def _kmeans_nmi(x, codes, seed, n_init):
    from sklearn.cluster import KMeans  # imported here: only NMI needs scikit-learn
    from sklearn.metrics import normalized_mutual_info_score

    pred = KMeans(n_clusters=int(codes.max()) + 1, n_init=n_init, random_state=seed).fit_predict(x)
    return float(100.0 * normalized_mutual_info_score(codes, pred))


@torch.no_grad()
def triplet_metrics(anchor, positive, negative, margin=1.0):
    """Loss, accuracy (% with d(a,p) < d(a,n)) and mean cosine similarities of explicit triplets.

    Distances are ``F.pairwise_distance`` (eps=1e-6), as in ``nn.TripletMarginLoss(p=2)``.
    """
    a, p, n = _as_float(anchor), _as_float(positive), _as_float(negative)
    d_ap, d_an = F.pairwise_distance(a, p), F.pairwise_distance(a, n)
    return {
        "loss": F.triplet_margin_loss(a, p, n, margin=margin, p=2).item(),
        "triplet_accuracy": 100.0 * (d_ap < d_an).double().mean().item(),
        "cos_sim_ap": F.cosine_similarity(a, p, dim=1).mean().item(),
        "cos_sim_an": F.cosine_similarity(a, n, dim=1).mean().item(),
    }
