"""Retrieval and triplet metrics against hand-computed cases and brute-force loops."""
import math

import numpy as np
import pytest
import torch

from triplet.metrics import nmi, retrieval_metrics, triplet_metrics

KEYS = ["precision_at_1", "precision_at_5", "precision_at_10", "recall_at_1", "recall_at_2",
        "recall_at_4", "recall_at_8", "map_at_r", "r_precision"]


def brute_force(x, labels, ks=(1, 5, 10), recall_ks=(1, 2, 4, 8), is_query=None):
    """Definition-by-definition retrieval metrics: one Python loop per query, float64.

    ``is_query``: rows marked True query the unmarked rows only (query-gallery protocol)."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = list(np.asarray(labels))
    n = len(labels)
    prec = {k: [] for k in ks}
    rec = {k: [] for k in recall_ks}
    maps, rps = [], []
    queries = range(n) if is_query is None else [i for i in range(n) if is_query[i]]
    for q in queries:
        sims = x @ x[q]
        candidates = [j for j in range(n) if j != q and (is_query is None or not is_query[j])]
        order = sorted(candidates, key=lambda j: (-sims[j], j))
        rel = [labels[j] == labels[q] for j in order]
        for k in ks:
            prec[k].append(sum(rel[:k]) / min(k, len(candidates)))
        for k in recall_ks:
            rec[k].append(float(any(rel[:k])))
        r = sum(labels[j] == labels[q] for j in candidates)
        if r == 0:
            continue
        rps.append(sum(rel[:r]) / r)
        maps.append(sum(sum(rel[:i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    out = {f"precision_at_{k}": 100 * np.mean(v) for k, v in prec.items()}
    out.update({f"recall_at_{k}": 100 * np.mean(v) for k, v in rec.items()})
    out["map_at_r"] = 100 * np.mean(maps)
    out["r_precision"] = 100 * np.mean(rps)
    return out


def on_circle(degrees):
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1) * 3.0  # not unit: the function normalises


def test_hand_computed_2d():
    # class 0 at 0, 10, 40 degrees; class 1 at 22, 75; class 2 (alone) at 180.
    # Neighbour classes by angle: q0 A B A B C, q1 A B A B C, q2 B A B A C,
    # q3 A A A B C, q4 A B A A C, q5 (singleton) all misses.
    x = on_circle([0, 10, 40, 22, 75, 180])
    y = [0, 0, 0, 1, 1, 2]
    m = retrieval_metrics(x, y, with_nmi=False)
    assert m["precision_at_1"] == pytest.approx(100 * 2 / 6)
    assert m["precision_at_5"] == pytest.approx(100 * (2 + 2 + 2 + 1 + 1 + 0) / 5 / 6)
    assert m["precision_at_10"] == pytest.approx(m["precision_at_5"])  # only 5 others exist
    assert m["recall_at_1"] == pytest.approx(100 * 2 / 6)
    assert m["recall_at_2"] == pytest.approx(100 * 4 / 6)
    assert m["recall_at_4"] == pytest.approx(100 * 5 / 6)
    assert m["recall_at_8"] == pytest.approx(100 * 5 / 6)
    # singleton q5 is left out: R = 2, 2, 2, 1, 1
    assert m["r_precision"] == pytest.approx(100 * (0.5 + 0.5 + 0.5 + 0 + 0) / 5)
    assert m["map_at_r"] == pytest.approx(100 * (0.5 + 0.5 + 0.25 + 0 + 0) / 5)
    assert sorted(m) == sorted(KEYS)
    assert all(type(v) is float for v in m.values())


def test_hand_computed_exact_ties_break_by_lower_index():
    # Duplicates: every similarity is exactly 1 or 0. Orders (lower index first among ties):
    # q0: 1 2 3 4 -> B A B A; q1: 0 2 3 4 -> A A B A; q2: 0 1 3 4 -> A B B A;
    # q3: 4 0 1 2 -> A A B A; q4: 3 0 1 2 -> B A B A.
    x = [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]]
    y = [0, 1, 0, 1, 0]
    m = retrieval_metrics(x, y, with_nmi=False)
    assert m["precision_at_1"] == pytest.approx(20.0)
    assert m["recall_at_2"] == pytest.approx(60.0)
    assert m["r_precision"] == pytest.approx(100 * (0.5 + 0 + 0.5 + 0 + 0.5) / 5)
    assert m["map_at_r"] == pytest.approx(100 * (0.25 + 0 + 0.5 + 0 + 0.25) / 5)


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_matches_brute_force_random(chunk_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 16)).astype(np.float32)
    y = rng.integers(0, 12, size=150)
    y[0] = 99  # one singleton class
    m = retrieval_metrics(x, y, chunk_size=chunk_size, with_nmi=False)
    expected = brute_force(x, y)
    for k in KEYS:
        assert m[k] == pytest.approx(expected[k], abs=1e-9), k


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_query_gallery_matches_brute_force(chunk_size):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 8)).astype(np.float32)
    y = rng.integers(0, 6, size=90)
    is_query = rng.random(90) < 0.3
    x[np.flatnonzero(~is_query)[:4]] = x[np.flatnonzero(~is_query)[4]]  # exact ties in the gallery
    m = retrieval_metrics(x, y, chunk_size=chunk_size, with_nmi=False, is_query=is_query)
    expected = brute_force(x, y, is_query=is_query)
    for k in KEYS:
        assert m[k] == pytest.approx(expected[k], abs=1e-9), k


def test_query_gallery_hand_computed():
    """Queries at 0 and 90 degrees; the gallery at 10 (class a), 85 (b), 100 (a). Each query is
    ranked against the gallery only, never against the other query."""
    x = on_circle([0, 90, 10, 85, 100])
    m = retrieval_metrics(x, ["a", "b", "a", "b", "a"], ks=(1, 3), recall_ks=(1,), with_nmi=False,
                          is_query=[True, True, False, False, False])
    # query 0 (a): 10(a), 85(b), 100(a) -> P@1 1, P@3 2/3; R=2: AP@R 1/2, R-precision 1/2
    # query 90 (b): 85(b), 100(a), 10(a) -> P@1 1, P@3 1/3; R=1: AP@R 1, R-precision 1
    assert m["precision_at_1"] == pytest.approx(100.0)
    assert m["precision_at_3"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert m["map_at_r"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert m["r_precision"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    with pytest.raises(ValueError, match="some but not all"):
        retrieval_metrics(x, [0, 1, 0, 1, 0], is_query=[True] * 5)


@pytest.mark.parametrize("n, chunk_size", [(120, 5), (120, 64), (120, 10_000), (13, 4)])
def test_matches_brute_force_with_many_exact_ties(n, chunk_size):
    # 16 distinct +-1 vectors in 4-D: normalised entries are +-0.5, so every similarity is
    # exactly one of -1, -0.5, 0, 0.5, 1 and most rows have ties across the k-th boundary
    # (with n = 13 the top 10 reaches the negative similarities too).
    rng = np.random.default_rng(1)
    x = rng.choice([-1.0, 1.0], size=(n, 4))
    y = rng.integers(0, 6 if n > 20 else 3, size=n)
    m = retrieval_metrics(x, y, chunk_size=chunk_size, with_nmi=False)
    expected = brute_force(x, y)
    for k in KEYS:
        assert m[k] == pytest.approx(expected[k], abs=1e-9), k


def test_collapsed_embeddings_rank_by_index():
    x = np.ones((30, 3))
    y = np.arange(30) % 3
    m = retrieval_metrics(x, y, chunk_size=8, with_nmi=False)
    expected = brute_force(x, y)
    for k in KEYS:
        assert m[k] == pytest.approx(expected[k], abs=1e-9), k


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    y = rng.integers(0, 5, size=80)
    a = retrieval_metrics(x, y, chunk_size=16, seed=3)
    b = retrieval_metrics(torch.from_numpy(x).double().requires_grad_(), torch.from_numpy(y),
                          chunk_size=16, seed=3)
    assert a == b
    assert sorted(a) == sorted(KEYS + ["nmi"])


def test_string_labels_and_custom_ks():
    x = on_circle([0, 10, 40, 22, 75, 180])
    m = retrieval_metrics(x, list("aaabbc"), ks=(2,), recall_ks=(3,), with_nmi=False)
    assert sorted(m) == ["map_at_r", "precision_at_2", "r_precision", "recall_at_3"]
    assert m["precision_at_2"] == pytest.approx(100 * (1 + 1 + 1 + 0 + 1 + 0) / 2 / 6)


def test_nmi_separable_clusters_is_100():
    rng = np.random.default_rng(3)
    centres = np.eye(4) * 10
    y = np.repeat(np.arange(4), 10)
    x = centres[y] + rng.normal(scale=0.1, size=(40, 4))
    assert nmi(x, y) == pytest.approx(100.0)
    assert retrieval_metrics(x, y)["nmi"] == pytest.approx(100.0)


def test_nmi_is_deterministic_and_matches_retrieval_metrics():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=200)
    value = nmi(x, y, seed=1)
    assert 0.0 <= value <= 100.0
    assert value == nmi(x, y, seed=1) == retrieval_metrics(x, y, seed=1)["nmi"]


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        retrieval_metrics(np.ones((1, 2)), [0])
    with pytest.raises(ValueError):
        retrieval_metrics(np.ones((3, 2)), [0, 1])


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_metrics_match_torch_and_loops(margin):
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(50, 6, generator=g) for _ in range(3))
    p[:3] = a[:3]  # d(a,p) ~ 0: exercises the eps in the distance
    m = triplet_metrics(a, p, n, margin=margin)
    expected = torch.nn.TripletMarginLoss(margin=margin, p=2)(a, p, n).item()
    assert m["loss"] == pytest.approx(expected, rel=1e-6)
    rows = [(a[i].tolist(), p[i].tolist(), n[i].tolist()) for i in range(50)]
    acc = [math.dist(ai, pi) < math.dist(ai, ni) for ai, pi, ni in rows]
    assert m["triplet_accuracy"] == pytest.approx(100 * sum(acc) / 50)

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))
    assert m["cos_sim_ap"] == pytest.approx(np.mean([cos(a[i], p[i]) for i in range(50)]), abs=1e-6)
    assert m["cos_sim_an"] == pytest.approx(np.mean([cos(a[i], n[i]) for i in range(50)]), abs=1e-6)
    assert m == triplet_metrics(a.numpy(), p.numpy(), n.numpy(), margin=margin)
    assert all(type(v) is float for v in m.values())
