"""Any torchvision backbone: the name check (torch-free), the generic head, and the chain
train step -> evaluation -> ONNX export with parity -> INT8, at tiny sizes with random weights."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision import models

from tests.conftest import ROOT, call_script
from triplet import engine
from triplet.mining import get_miner
from triplet.backbones import check_backbone, close_matches
from triplet.data.prepare import DataOptions, prepared_dir, read_manifest
from triplet.data.transforms import EvalTransform
from triplet.deploy.export import export_model, quantize_int8, run_metadata, verify
from triplet.deploy.inference import OnnxEmbedder
from triplet.errors import UserError
from triplet.model import EmbeddingNet, build_model


def test_backbones_module_does_not_import_torch():
    code = ("import sys; from triplet.backbones import check_backbone, HELP; check_backbone('resnet18'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_unknown_name_lists_close_matches():
    with pytest.raises(UserError, match=r"--backbone 'resnet5': not a torchvision classification model; "
                                        r"did you mean resnet50"):
        check_backbone("resnet5")
    assert close_matches("vit_b16", models.list_models(module=models))[0] == "vit_b_16"
    with pytest.raises(UserError, match="see torchvision.models.list_models"):
        check_backbone("qqqq")
    with pytest.raises(UserError, match="maskrcnn"):  # a detection model is not a classification trunk
        check_backbone("maskrcnn_resnet50_fpn")


def test_train_script_refuses_an_unknown_backbone_in_one_line(tmp_path):
    status, output = call_script("train", "--backbone", "convnext_tin", "--out", tmp_path / "run")
    assert status == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1 and ": error: --backbone 'convnext_tin': not a torchvision" in lines[0]
    assert "did you mean convnext_tiny" in lines[0]


def test_the_study_backbones_keep_their_checkpoint_layout():
    keys = set(EmbeddingNet("resnet18", 8).state_dict())
    assert "head.weight" in keys and "trunk.conv1.weight" in keys and not any(k.startswith("trunk.fc.") for k in keys)


def test_imagenet_style_state_dict_loads_without_its_classifier(tmp_path):
    """A torchvision state dict (classifier included) for a non-ResNet loads into the trunk."""
    reference = models.get_model("efficientnet_b0", weights=None)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model = build_model("efficientnet_b0", 8, str(tmp_path / "w.pt"))
    assert torch.equal(model.trunk.features[0][0].weight, reference.features[0][0].weight)
    with pytest.raises(UserError, match="does not match a resnet18 trunk|does not fit a resnet18 trunk"):
        build_model("resnet18", 8, str(tmp_path / "w.pt"))


def test_models_that_cannot_serve_as_a_trunk_are_one_line_errors():
    with pytest.raises(UserError, match="squeezenet1_0: has no linear classifier"):
        build_model("squeezenet1_0", 8)
    with pytest.raises(UserError, match="--image-size 40: vit_b_16 cannot be built for it"):
        build_model("vit_b_16", 8, image_size=40)


def test_a_vit_built_for_a_small_input_refuses_224_px_weights(tmp_path):
    torch.save(models.get_model("vit_b_16", weights=None).state_dict(), tmp_path / "vit.pt")
    with pytest.raises(UserError, match="does not fit a vit_b_16 trunk at --image-size 32"):
        build_model("vit_b_16", 8, str(tmp_path / "vit.pt"), image_size=32)


@pytest.mark.parametrize("backbone", ["resnet50", "convnext_tiny", "efficientnet_b0", "vit_b_16"])
def test_backbone_trains_evaluates_exports_and_quantises(backbone, synthetic_root, tmp_path):
    size = 32
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "test")
    paths, labels = paths[:8], labels[:8]
    torch.manual_seed(0)
    model = build_model(backbone, 16, "none", image_size=size)
    transform = EvalTransform(size)
    images = torch.stack([transform(p) for p in paths])
    # one step of packaged offline triplets: [anchors, positives, negatives], as the sampler collates them
    batch = (torch.cat([images[:4], images[4:], images[[5, 6, 7, 4]]]), torch.zeros(12, dtype=torch.int64))
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = engine.train_one_epoch(model, [batch], optimizer, torch.device("cpu"), "fp32", 1.0,
                                   get_miner("none"), progress=False)
    assert np.isfinite(stats["train_loss"]) and not torch.equal(before, model.head.weight)

    model.eval()
    with torch.no_grad():
        embeddings = model(images).numpy()
    metrics = engine.evaluate_embeddings(embeddings, np.asarray(labels), with_nmi=False)
    assert 0 <= metrics["precision_at_1"] <= 100

    options = {"backbone": backbone, "embedding_dim": 16, "image_size": size}
    metadata = run_metadata(tmp_path, options, metrics)
    fp32 = tmp_path / f"{backbone}.onnx"
    export_model(model, fp32, metadata)
    check = verify(model, fp32, paths)
    assert check["min_cosine"] > 0.9999

    int8 = tmp_path / f"{backbone}.int8.onnx"
    embedder = OnnxEmbedder(fp32)
    quantize_int8(fp32, int8, [embedder.preprocess(paths)], metadata)
    quantised = OnnxEmbedder(int8).embed(paths)
    assert quantised.shape == (8, 16) and np.allclose(np.linalg.norm(quantised, axis=1), 1, atol=1e-3)
    assert OnnxEmbedder(int8).metadata["precision"] == "int8"
