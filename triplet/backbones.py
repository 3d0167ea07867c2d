"""Backbone names, known in one place and checkable without importing torch at start-up.

The study's trunks (ResNet18/34) are listed here; any other torchvision classification model
(``resnet50``, ``convnext_tiny``, ``efficientnet_b0``, ``vit_b_16`` ...) is looked up in
torchvision's model registry only when a name outside that list is checked, so a script's
``--help`` never pays for importing torch.
"""
import difflib

from triplet.errors import UserError

DEFAULT_BACKBONE = "resnet18"
STUDY_BACKBONES = ("resnet18", "resnet34")
HELP = (f"trunk: any torchvision classification model name (resnet50, convnext_tiny, efficientnet_b0, "
        f"vit_b_16, ...); the study used {' and '.join(STUDY_BACKBONES)}")


def torchvision_backbones():
    """Every classification model in torchvision's registry (no detection, segmentation or video)."""
    from torchvision import models

    return models.list_models(module=models)


def close_matches(name, known, n=5):
    """The names in ``known`` that look like ``name``: difflib's ratio, plus names that contain it."""
    lowered = name.lower()
    matches = difflib.get_close_matches(lowered, known, n=n, cutoff=0.6)
    matches += [k for k in known if lowered and lowered in k and k not in matches]
    return matches[:n]


def check_backbone(name, option="--backbone"):
    """Return ``name`` when torchvision can build it; else a one-line error naming close matches."""
    if name in STUDY_BACKBONES:
        return name
    known = torchvision_backbones()
    if name in known:
        return name
    matches = close_matches(name, known)
    hint = f"did you mean {', '.join(matches)}?" if matches else \
        f"see torchvision.models.list_models() ({len(known)} names, e.g. {', '.join(STUDY_BACKBONES)})"
    raise UserError(f"{option} {name!r}: not a torchvision classification model; {hint}")
