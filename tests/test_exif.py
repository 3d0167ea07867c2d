"""A phone photo stored sideways with an EXIF orientation tag is seen upright everywhere an image
is decoded: the prepared copy, training's decoder, evaluation and the deployed ONNX embedder."""
import numpy as np
import pytest
import torch
from PIL import Image

from triplet.checkpoint import model_from_checkpoint
from triplet.data import sources
from triplet.data.prepare import DataOptions, prepare, read_manifest
from triplet.data.synthetic import render
from triplet.data.transforms import EvalTransform, load_image
from triplet.deploy.export import export_model, run_metadata
from triplet.deploy.inference import OnnxEmbedder
from triplet.deploy.preprocess import open_rgb

ORIENTATION = 0x0112
ROTATE_90_CW = 6  # "the camera was turned: rotate 90 degrees clockwise to view"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """upright.png, and sideways.png: the same pixels stored turned with tag 6 (plus the same
    file without the tag, which is what a viewer ignoring EXIF would show)."""
    folder = tmp_path_factory.mktemp("exif")
    upright, _ = render(3, np.random.default_rng(1), 64)  # 64 x 48, landscape
    upright.save(folder / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 48 x 64: what the sensor wrote
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATE_90_CW
    stored.save(folder / "sideways.png", exif=exif)
    stored.save(folder / "untagged.png")
    stored.save(folder / "sideways.jpg", exif=exif, quality=100)
    return folder, np.asarray(upright)


@pytest.mark.parametrize("name", ["sideways.png", "sideways.jpg"])
def test_every_decoder_turns_the_photo_upright(twins, name):
    folder, upright = twins
    with Image.open(folder / name) as raw:  # the stored pixels, turned by hand
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270), np.int16)
    if name.endswith(".png"):
        assert np.array_equal(expected, upright)
    assert np.array_equal(np.asarray(open_rgb(folder / name), np.int16), expected)
    decoded = load_image(folder / name).permute(1, 2, 0).numpy().astype(np.int16)  # libjpeg/libpng, not Pillow
    assert decoded.shape == expected.shape and np.abs(decoded - expected).mean() < 1
    assert open_rgb(folder / "untagged.png").size == (48, 64)  # without the tag it stays sideways


def test_the_prepared_copy_is_upright(twins, tmp_path):
    folder, _ = twins
    photos = tmp_path / "photos"
    for k, name in enumerate(["a", "b"]):
        (photos / name).mkdir(parents=True)
        for i in range(4):
            image = Image.open(folder / "sideways.png") if (k, i) == (0, 0) else render(k, np.random.default_rng(i), 64)[0]
            image.save(photos / name / f"{i}.png", **({"exif": image.getexif()} if (k, i) == (0, 0) else {}))
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=48, val_fraction=0), workers=1,
                       log=lambda *a: None, dataset=sources.from_image_folder(photos), test_fraction=0.5)
    paths = read_manifest(prepared, "train")[0] + read_manifest(prepared, "test")[0]
    with Image.open(next(p for p in paths if p.endswith("a/0.png.jpg"))) as image:
        assert image.size == (64, 48)  # landscape, as the photo was taken


def test_a_tagged_photo_embeds_like_its_upright_twin_in_torch_and_onnx(twins, tiny_run, tmp_path):
    folder, _ = twins
    model, checkpoint = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    options = checkpoint["config"]["options"]
    path = tmp_path / "m.onnx"
    export_model(model, path, run_metadata(tiny_run, options, {}))
    images = [folder / "upright.png", folder / "sideways.png", folder / "untagged.png"]
    transform = EvalTransform(options["image_size"])
    with torch.no_grad():
        torch_out = model(torch.stack([transform(p) for p in images])).numpy()
    onnx_out = OnnxEmbedder(path).embed(images)
    assert np.abs(torch_out - onnx_out).max() < 1e-4  # torch/ONNX parity holds for tagged photos too
    for out in (torch_out, onnx_out):
        assert float(out[0] @ out[1]) > 0.9999  # tagged photo == its upright twin
        assert float(out[0] @ out[2]) < float(out[0] @ out[1])  # read sideways, it would not be
