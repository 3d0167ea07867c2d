"""scripts/benchmark_search.py on tiny galleries: the table's fields, exact rows exact, the target verdict."""
import json

import numpy as np

from tests.conftest import call_script
from triplet.bench.search import best_meeting, recall_at, unit_vectors


def test_recall_by_hand():
    found = np.array([[1, 2, 3], [4, 5, -1]])
    truth = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at(found, truth) == (2 / 3 + 2 / 3) / 2


def test_unit_vectors_are_seeded_and_unit_length_across_chunks():
    a, b = unit_vectors(250, 8, seed=3, chunk=100), unit_vectors(250, 8, seed=3, chunk=100)
    assert np.array_equal(a, b) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert not np.array_equal(a, unit_vectors(250, 8, seed=4, chunk=100))


def test_best_meeting_picks_the_fastest_row_that_reaches_the_recall():
    rows = [{"single_p50_ms": 1.0, "recall_at_10": 0.9}, {"single_p50_ms": 3.0, "recall_at_10": 0.97},
            {"single_p50_ms": 2.0, "recall_at_10": 0.96}]
    assert best_meeting(rows, 10, 0.95) is rows[2] and best_meeting(rows, 10, 0.99) is None


def test_benchmark_script_writes_json_and_table(tiny_run, tmp_path):
    out = tmp_path / "bench.json"
    status, text = call_script("benchmark_search", "--sizes", 300, 600, "--dim", 8, "--queries", 20, "--batch", 10,
                               "--hnsw-max", 300, "--run", tiny_run, "--out", out)
    assert status == 0, text
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {r["gallery"] for r in rows} == {"random 3e2", "random 6e2", f"run {tiny_run.name}"}
    assert any(r["index"] == "faiss-hnsw" and r["size"] == 300 for r in rows)
    assert not any(r["index"] == "faiss-hnsw" and r["size"] == 600 for r in rows)  # over --hnsw-max
    for row in rows:
        assert row["single_p99_ms"] >= row["single_p50_ms"] > 0 and row["size_mb"] > 0
        if row["index"] in ("numpy", "faiss-flat"):
            assert row["recall_at_10"] == 1.0
    assert report["target"]["gallery"] == 600 and report["target"]["met"] in (True, False)
    table = out.with_suffix(".md").read_text()
    assert table.count("| random 6e2 |") == sum(r["gallery"] == "random 6e2" for r in rows)
    assert "Target: 600 vectors" in table
