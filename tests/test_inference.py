"""The torch-free deployment side: OnnxEmbedder, its errors, and scripts/search.py with its cache."""
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from tests.conftest import run_script
from triplet.checkpoint import model_from_checkpoint
from triplet.deploy.export import export_model, run_metadata
from triplet.errors import UserError
from triplet.fileio import read_json
from triplet.deploy.inference import OnnxEmbedder
from triplet.data.prepare import prepared_dir, read_manifest, run_data_options
from triplet.data.transforms import EvalTransform


@pytest.fixture(scope="module")
def images(tiny_run):
    options = read_json(tiny_run / "config.json")["options"]
    return read_manifest(prepared_dir(run_data_options(options)), "test")[0]


@pytest.fixture(scope="module")
def model_path(tiny_run, tmp_path_factory):
    model, checkpoint = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_model(model, path, run_metadata(tiny_run, checkpoint["config"]["options"],
                                           read_json(tiny_run / "metrics.json")))
    return path


def test_metadata_is_exposed(model_path, tiny_run):
    embedder = OnnxEmbedder(model_path, threads=1)
    assert (embedder.image_size, embedder.resize_size, embedder.embedding_dim) == (32, 37, 128)
    assert embedder.metadata["backbone"] == "resnet18" and embedder.metadata["source_run"] == str(tiny_run)
    assert embedder.embed([]).shape == (0, 128)


def test_preprocessing_matches_the_evaluation_transform(model_path, images):
    embedder = OnnxEmbedder(model_path)
    transform = EvalTransform(32)
    expected = torch.stack([transform(p) for p in images[:6]]).numpy()
    assert np.abs(embedder.preprocess(images[:6]) - expected).max() <= 1e-5
    pil = [Image.open(p) for p in images[:2]]
    assert np.abs(embedder.preprocess(pil) - expected[:2]).max() <= 1e-5


def test_embeddings_match_torch(model_path, tiny_run, images):
    model, _ = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    with torch.inference_mode():
        expected = model(torch.stack([EvalTransform(32)(p) for p in images[:9]])).numpy()
    got = OnnxEmbedder(model_path).embed(images[:9], batch_size=4)  # batches of 4, 4 and 1
    assert got.dtype == np.float32 and got.shape == (9, 128)
    assert np.abs(got - expected).max() <= 1e-4 and ((got * expected).sum(1) >= 0.9999).all()
    assert np.array_equal(OnnxEmbedder(model_path).embed(images[0]), got[:1])


def test_import_and_embed_without_torch(model_path, images):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "from triplet.deploy.inference import OnnxEmbedder\n"
            f"print(OnnxEmbedder({str(model_path)!r}).embed([{images[0]!r}]).shape)\n"
            "assert not any(m.startswith('torch') and sys.modules[m] is not None for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(1, 128)" in result.stdout


@pytest.mark.parametrize("case", ["missing", "not_onnx", "no_metadata"])
def test_clear_errors_for_bad_model_files(model_path, tmp_path, case):
    path = tmp_path / "model.onnx"
    if case == "not_onnx":
        path.write_text("not a model\n")
    elif case == "no_metadata":
        proto = onnx.load(model_path)
        del proto.metadata_props[:]
        onnx.save(proto, path)
    with pytest.raises(UserError) as error:
        OnnxEmbedder(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert {"missing": "not found", "not_onnx": "not a loadable ONNX model",
            "no_metadata": "no triplet metadata"}[case] in message


def test_clear_error_for_an_unreadable_image(model_path, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg: not a readable image"):
        OnnxEmbedder(model_path).embed([bad])


def test_search_cli_finds_the_query_and_caches_the_gallery(model_path, images, tmp_path):
    gallery = tmp_path / "gallery"
    for path in images[:12]:
        target = gallery / os.path.basename(os.path.dirname(path)) / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    query = sorted(gallery.rglob("*.jpg"))[5]
    blocker = tmp_path / "blocker"  # scripts/search.py must not need torch either
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not available in deployment')\n")
    env = {"PYTHONPATH": str(blocker)}

    def search(*extra):
        result = run_script("search", "--model", model_path, "--gallery", gallery, "--query", query, *extra,
                            "--top-k", 3, env=env)
        return result.stdout.splitlines()

    lines = search()
    assert "embedding 12 of 12" in lines[0]
    first = lines[2].split()
    assert first[0] == "1." and float(first[1]) > 0.9999
    assert first[2] == query.relative_to(gallery).as_posix()
    caches = list(gallery.glob(".triplet-gallery-*.npz"))
    assert len(caches) == 1

    assert not any("embedding" in line for line in search())  # all cached
    added = gallery / "new" / "copy.jpg"
    added.parent.mkdir()
    shutil.copy(query, added)
    lines = search(query)  # two queries; the copy is as close as the original
    assert "embedding 1 of 13" in lines[0] and len([l for l in lines if l.endswith(":")]) == 2
    assert {lines[2].split()[2], lines[3].split()[2]} == {query.relative_to(gallery).as_posix(), "new/copy.jpg"}
    with np.load(caches[0]) as cache:
        assert len(cache["paths"]) == 13


def test_search_refuses_a_decompression_bomb_in_one_line(model_path, images, tmp_path):
    from tests.conftest import call_script

    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb, optimize=True)  # 100 megapixels in a small file
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shutil.copy(images[0], gallery / "a.jpg")
    status, output = call_script("search", "--model", model_path, "--gallery", gallery, "--query", bomb)
    assert status == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert "bomb.png: 10000x10000 pixels (100 megapixels) is over the limit of 64 megapixels" in output
    status, output = call_script("search", "--model", model_path, "--gallery", gallery, "--query", images[0],
                                 "--max-pixels", 100)
    assert status == 2 and "over the limit of 0.0001 megapixels" in output
