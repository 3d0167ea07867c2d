"""EmbeddingNet: a torchvision ResNet trunk, a linear projection, L2-normalised output.

The model is rebuilt from ``model_args`` (backbone, embedding_dim) alone, which every
checkpoint stores, so evaluation and export need nothing else.
"""
import os
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from triplet.checkpoint import torch_load
from triplet.errors import UserError

BACKBONES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
}


class EmbeddingNet(nn.Module):
    def __init__(self, backbone="resnet18", embedding_dim=128):
        super().__init__()
        if backbone not in BACKBONES:
            raise UserError(f"--backbone {backbone!r}: unknown; choose one of {', '.join(BACKBONES)}")
        self.trunk = BACKBONES[backbone][0](weights=None)
        features = self.trunk.fc.in_features
        self.trunk.fc = nn.Identity()
        self.head = nn.Linear(features, embedding_dim)

    def forward(self, images):
        # Normalised in float32 even under bf16/fp16 autocast: unit length to 1e-6, not 1e-3.
        return F.normalize(self.head(self.trunk(images)).float(), dim=1)


def imagenet_state_dict(backbone):
    """torchvision's ImageNet weights through its own API (cached under the torch hub folder)."""
    weights = BACKBONES[backbone][1]
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


def build_model(backbone="resnet18", embedding_dim=128, weights="none"):
    """A fresh EmbeddingNet; ``weights`` is 'imagenet', 'none' or a path to a trunk state dict."""
    model = EmbeddingNet(backbone, embedding_dim)
    if weights == "none":
        return model
    state = imagenet_state_dict(backbone) if weights == "imagenet" else load_state_dict_file(weights)
    state = {k.removeprefix("trunk."): v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    missing, unexpected = model.trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--weights {weights}: does not match a {backbone} trunk "
                        f"({len(missing)} missing keys, {len(unexpected)} unexpected, e.g. "
                        f"{(missing or unexpected)[0]})")
    return model


def build_seeded_model(seed, *args, **kwargs):
    """``build_model(*args, **kwargs)`` with its random initialisation drawn from ``seed`` alone.

    train.py starts from this model and ``evaluate.py --checkpoint none`` rebuilds it from the
    run's seed, so the untrained baseline is exactly the training's starting point whatever ran
    before; the caller's torch random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(*args, **kwargs)
