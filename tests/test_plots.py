"""plot_embeddings.py and triplet.reporting.plots: the three figures, the PCA path, the one-line errors."""
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_script
from triplet import machine
from triplet.reporting import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the shared tiny run, without its (large, unused) checkpoints."""
    target = tmp_path / "tiny-resnet18"
    shutil.copytree(tiny_run, target, ignore=shutil.ignore_patterns("*.pt"))
    return target


def assert_png(path, min_bytes=5_000):
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes, f"{path.name} is suspiciously small"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert 300 < width < 2500 and 200 < height < 2500, (path.name, image.size)


def test_script_writes_all_three_figures(run_copy):
    result = run_script("plot_embeddings", "--run", run_copy)
    for name in ("tsne.png", "retrieval.png", "curves.png"):
        assert_png(run_copy / name)
        assert f"wrote {run_copy / name}" in result.stdout
    assert not list(run_copy.glob(".*.tmp*")), "atomic writes left a temporary file behind"


def test_pca_subsample_and_no_history(run_copy):
    (run_copy / "history.csv").unlink()  # what an untrained baseline folder looks like
    messages = []
    written = plots.plot_run(run_copy, method="pca", max_points=20, seed=1, log=messages.append)
    assert [p.name for p in written] == ["pca.png", "retrieval.png"]
    assert_png(run_copy / "pca.png")
    assert not (run_copy / "tsne.png").exists() and not (run_copy / "curves.png").exists()
    assert any(m.startswith("pca of 20 test embeddings") for m in messages)
    assert any("skipping curves.png" in m for m in messages)


def test_missing_embeddings_is_a_one_line_error(run_copy, tmp_path):
    (run_copy / "test_embeddings.npz").unlink()
    result = run_script("plot_embeddings", "--run", run_copy, check=False)
    assert result.returncode == 2
    assert "test_embeddings.npz" in result.stderr and "evaluate.py" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_script("plot_embeddings", "--run", tmp_path / "nowhere", check=False)
    assert result.returncode == 2 and "run folder not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_queries_are_seeded_and_from_distinct_classes():
    labels = np.repeat(np.arange(10), 3)
    first = plots.choose_queries(labels, 6, seed=3)
    assert first.tolist() == plots.choose_queries(labels, 6, seed=3).tolist()
    assert len(set(labels[first].tolist())) == 6


def test_class_names_come_from_the_class_folder():
    paths = ["/d/images/001.Black_footed_Albatross/a.jpg", "/d/images/002.Laysan_Albatross/b.jpg", ""]
    names = plots.class_names(np.array([1, 2, 3]), paths)
    assert names == {1: "Black footed Albatross", 2: "Laysan Albatross", 3: "class 3"}


def test_small_maps_use_one_thread_and_large_ones_the_cores(monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert plots.usable_cores() == 4  # the cores this process may use (its affinity mask), not the machine's
    assert plots.projection_threads(48) == 1
    assert plots.projection_threads(2500) == 2
    assert plots.projection_threads(5794) == 4


def test_a_small_tsne_runs_inside_a_one_thread_limit(monkeypatch):
    import threadpoolctl

    seen, original = [], threadpoolctl.threadpool_limits

    def spy(limits=None, **kwargs):
        seen.append(limits)
        return original(limits=limits, **kwargs)

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", spy)
    xy = plots.project(np.random.default_rng(0).normal(size=(48, 8)), "tsne", seed=0)
    assert xy.shape == (48, 2) and seen == [1]


def test_truncated_embeddings_are_one_line_for_plots_and_the_browse_set(run_copy):
    """A truncated .npz is zipfile.BadZipFile, which is no OSError: it used to be a traceback."""
    from triplet.deploy.server import load_browse_set
    from triplet.errors import UserError

    npz = run_copy / "test_embeddings.npz"
    npz.write_bytes(npz.read_bytes()[:300])
    result = run_script("plot_embeddings", "--run", run_copy, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "test_embeddings.npz" in result.stderr and "evaluate.py" in result.stderr
    with pytest.raises(UserError, match="damaged .*evaluate.py --run"):
        load_browse_set(run_copy)


def test_embeddings_that_are_not_finite_are_one_line_not_an_sklearn_traceback(run_copy):
    from triplet.errors import UserError

    npz = run_copy / "test_embeddings.npz"
    with np.load(npz) as data:
        arrays = dict(data)
    arrays["embeddings"][3] = np.nan
    np.savez(npz, **arrays)
    with pytest.raises(UserError, match="1 of .* embeddings are not finite .*lower --lr"):
        plots.load_embeddings(run_copy)


def test_a_damaged_history_keeps_the_curves_and_says_how_to_restore_it(run_copy):
    """A history.csv without its columns drew empty axes over a good curves.png, exit 0."""
    (run_copy / "curves.png").write_bytes(b"the good curves")
    (run_copy / "history.csv").write_text("epoch,foo\n1,2,3\n")
    result = run_script("plot_embeddings", "--run", run_copy, check=False)
    assert result.returncode == 2 and "history.csv: has no column train_loss" in result.stderr
    assert "rewrites it from checkpoint_last.pt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (run_copy / "curves.png").read_bytes() == b"the good curves"
