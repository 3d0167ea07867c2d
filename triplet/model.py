"""EmbeddingNet: any torchvision classification trunk, a linear projection, L2-normalised output.

The trunk comes from torchvision's model registry (``get_model``); its classifier (the last
linear layer that maps to the 1,000 ImageNet classes) is replaced by ``nn.Identity`` and the
embedding head reads the features that layer read, so ResNets, ConvNeXts, EfficientNets,
MobileNets, RegNets, ViTs and Swins all work the same way. The model is rebuilt from
``model_args`` (backbone, embedding_dim, image_size) alone, which every checkpoint stores, so
evaluation and export need nothing else.
"""
import os
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from triplet.backbones import check_backbone
from triplet.checkpoint import torch_load
from triplet.errors import UserError, first_line, last_line

IMAGENET_CLASSES = 1000
# Models whose training-mode forward would return auxiliary outputs: build them without.
BUILD_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                 "inception_v3": {"aux_logits": False, "init_weights": True}}


def find_classifier(trunk):
    """The dotted name and module of the last linear layer that outputs the ImageNet classes."""
    found = [(name, m) for name, m in trunk.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES]
    return found[-1] if found else (None, None)


def _replace(root, dotted, module):
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def build_trunk(backbone, image_size=None):
    """A randomly initialised torchvision trunk without its classifier; (trunk, feature size, classifier name).

    Models tied to one input size (ViTs) are built for ``image_size`` when it differs from their default.
    """
    check_backbone(backbone)
    trunk = models.get_model(backbone, weights=None, **BUILD_OPTIONS.get(backbone, {}))
    native = getattr(trunk, "image_size", None)
    if isinstance(native, int) and image_size and image_size != native:
        try:
            trunk = models.get_model(backbone, weights=None, image_size=image_size)
        except (AssertionError, ValueError) as e:
            raise UserError(f"--image-size {image_size}: {backbone} cannot be built for it ({e}); use a "
                            f"multiple of its patch size, such as {native}") from e
    name, classifier = find_classifier(trunk)
    if classifier is None:
        raise UserError(f"--backbone {backbone}: has no linear classifier to replace with an embedding "
                        f"head; choose another torchvision model")
    _replace(trunk, name, nn.Identity())
    return trunk, classifier.in_features, name


class EmbeddingNet(nn.Module):
    def __init__(self, backbone="resnet18", embedding_dim=128, image_size=None):
        super().__init__()
        self.trunk, features, self.classifier_name = build_trunk(backbone, image_size)
        self.head = nn.Linear(features, embedding_dim)

    def forward(self, images):
        # Normalised in float32 even under bf16/fp16 autocast: unit length to 1e-6, not 1e-3.
        return F.normalize(self.head(self.trunk(images)).float(), dim=1)


def imagenet_state_dict(backbone):
    """The backbone's default ImageNet weights through torchvision's weights API (cached by torch hub)."""
    weights = models.get_model_weights(backbone).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"could not get the ImageNet weights for {backbone} ({e}); download {weights.url} and put "
            f"it at {cached}, or pass --weights PATH (a local state dict) or --weights none (random "
            f"init)") from e


def load_state_dict_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; use 'imagenet', 'none' or a state-dict path")
    state = torch_load(path, f"--weights {path}")
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: holds no state dict")
    return state


def trunk_weights(state, classifier_name):
    """A torchvision (or our checkpoint's) state dict without the classifier, auxiliary heads or our head."""
    state = {k.removeprefix("trunk."): v for k, v in state.items() if not k.startswith("head.")}
    return {k: v for k, v in state.items()
            if not k.startswith(classifier_name + ".") and not k.lower().startswith(("aux", "auxlogits"))}


def build_model(backbone="resnet18", embedding_dim=128, weights="none", image_size=None):
    """A fresh EmbeddingNet; ``weights`` is 'imagenet', 'none' or a path to a trunk state dict."""
    model = EmbeddingNet(backbone, embedding_dim, image_size)
    if weights == "none":
        return model
    state = imagenet_state_dict(backbone) if weights == "imagenet" else load_state_dict_file(weights)
    try:
        missing, unexpected = model.trunk.load_state_dict(trunk_weights(state, model.classifier_name), strict=False)
    except RuntimeError as e:  # a shape mismatch, such as a ViT's position embedding at another input size
        raise UserError(f"--weights {weights}: does not fit a {backbone} trunk at --image-size {image_size} "
                        f"(train at the size the weights were made for, 224 for torchvision's): "
                        f"{last_line(e)}") from e
    if missing or unexpected:
        raise UserError(f"--weights {weights}: does not match a {backbone} trunk "
                        f"({len(missing)} missing keys, {len(unexpected)} unexpected, e.g. "
                        f"{(missing or unexpected)[0]})")
    return model


def check_input_size(backbone, image_size):
    """Fail before a run folder is written, not in the first step: some trunks' pooling or
    attention windows do not fit small inputs (alexnet, inception_v3, maxvit_t at 32-64 px).
    The trial model lives on the meta device: shapes only, no memory, no weights, milliseconds."""
    try:
        with torch.device("meta"):
            trial = EmbeddingNet(backbone, 8, image_size).eval()
    except (RuntimeError, NotImplementedError):  # RegNet reads tensor values while it is built: no trial
        return
    try:
        with torch.device("meta"):
            trial(torch.zeros(2, 3, image_size, image_size))
    except NotImplementedError:  # an op without a meta kernel says nothing about the size
        return
    except RuntimeError as e:
        raise UserError(f"--image-size {image_size}: too small for {backbone} ({first_line(e)}); use a larger "
                        f"--image-size (224, the default, fits every trunk)") from e


def build_seeded_model(seed, *args, **kwargs):
    """``build_model(*args, **kwargs)`` with its random initialisation drawn from ``seed`` alone.

    train.py starts from this model and ``evaluate.py --checkpoint none`` rebuilds it from the
    run's seed, so the untrained baseline is exactly the training's starting point whatever ran
    before; the caller's torch random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(*args, **kwargs)
