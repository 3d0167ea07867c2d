"""The torch-free deployment side: OnnxEmbedder and its errors (search: test_search.py)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from tests.conftest import call_script
from triplet.checkpoint import model_from_checkpoint
from triplet.errors import UserError
from triplet.deploy.inference import OnnxEmbedder
from triplet.data.transforms import EvalTransform


@pytest.fixture(scope="module")
def images(test_images):
    return test_images


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


@pytest.mark.parametrize("changes, problem", [
    ({"image_size": 64, "resize_size": 73}, "image_size 64, but the model's input is batch x 3 x 32 x 32"),
    ({"embedding_dim": 64}, "embedding_dim 64, but the model's output is batch x 128"),
    ({"image_size": 100_000}, "image_size 100000 is over 8000 pixels"),
    ({"resize_size": 10}, "resize_size 10 is smaller than image_size 32"),
])
def test_metadata_that_disagrees_with_the_graph_is_one_line(model_path, images, tmp_path, changes, problem):
    """Each once ended search.py in a traceback from onnxruntime, NumPy or Pillow, or (resize 10) ran wrongly."""
    proto = onnx.load(model_path)
    for prop in proto.metadata_props:
        if prop.key in changes:
            prop.value = json.dumps(changes[prop.key])
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shutil.copy(images[0], gallery / "a.jpg")
    status, output = call_script("search", "--model", path, "--gallery", gallery, "--query", images[0], "--no-cache")
    assert status == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert f"{path}: damaged triplet metadata ({problem}" in output and "export it again" in output


def test_clear_error_for_an_unreadable_image(model_path, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg: not a readable image"):
        OnnxEmbedder(model_path).embed([bad])


def test_search_refuses_a_decompression_bomb_in_one_line(model_path, images, tmp_path):
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
    assert status == 2 and "over the limit of 100 pixels;" in output
