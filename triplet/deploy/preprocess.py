"""The evaluation preprocessing, in NumPy and Pillow only: the one contract torch and ONNX share.

Evaluation in torch and the deployed ONNX embedder both call ``preprocess``, so their inputs
are identical by construction: decode with Pillow, apply the EXIF orientation, convert to RGB, resize the short side to
``resize_size`` (bilinear, antialiased), centre-crop ``image_size`` (torchvision's rounding),
scale to [0, 1] and normalise. No torch import here: deployment needs only NumPy and Pillow.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from triplet.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size_for(image_size):
    """The classic 256/224 ratio: evaluation resizes to this, then centre-crops ``image_size``."""
    return int(round(image_size * 256 / 224))


def open_rgb(source):
    """A path or a PIL image -> an upright RGB PIL image; an unreadable file is named in the error.

    Upright: a phone photo stored sideways with an EXIF orientation tag is turned as viewers show
    it, as the prepared copy and training's decoder do, so it embeds like its upright twin.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source).convert("RGB")
    try:
        with Image.open(source) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{source}: not a readable image ({e})") from e


def preprocess(image, image_size, resize_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB PIL image -> float32 array 3 x image_size x image_size, as the model expects."""
    resize_size = resize_size or resize_size_for(image_size)
    width, height = image.size
    if width <= height:  # torchvision's Resize(int): short side exact, long side truncated
        size = (resize_size, int(resize_size * height / width))
    else:
        size = (int(resize_size * width / height), resize_size)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def list_images(folder, extensions=(".jpg", ".jpeg", ".png", ".bmp", ".webp")):
    """Image files under ``folder`` (recursively), sorted for a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in extensions and p.is_file())
