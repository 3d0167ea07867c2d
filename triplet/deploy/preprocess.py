"""The evaluation preprocessing, in NumPy and Pillow only: the one contract torch and ONNX share.

Evaluation in torch and the deployed ONNX embedder both call ``preprocess``, so their inputs
are identical by construction: decode with Pillow, apply the EXIF orientation, convert to RGB, resize the short side to
``resize_size`` (bilinear, antialiased), centre-crop ``image_size`` (torchvision's rounding),
scale to [0, 1] and normalise. No torch import here: deployment needs only NumPy and Pillow.
"""
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from triplet.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size_for(image_size):
    """The classic 256/224 ratio: evaluation resizes to this, then centre-crops ``image_size``."""
    return int(round(image_size * 256 / 224))


DEFAULT_MAX_PIXELS = 64_000_000  # a 50-megapixel photo (8688 x 5792) passes; a 10000 x 10000 bomb does not
# The files a photo folder, a gallery and a query may be: the formats Pillow reads that cameras and
# phones write (GIF is left out: its frames are not one photo).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit (and 32-bit integer) grey


def _pixels(count):
    """``64 megapixels`` for a photo, ``1,000 pixels`` for a small --max-pixels (not "0.001 megapixels")."""
    return f"{count / 1e6:g} megapixels" if count >= 1_000_000 else f"{count:,} pixels"


def check_pixels(size, source, max_pixels=DEFAULT_MAX_PIXELS):
    """Refuse an image larger than ``max_pixels`` before it is decoded (a tiny file can hold a huge one)."""
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise UserError(f"{source}: {width}x{height} pixels ({_pixels(width * height)}) is over the limit of "
                        f"{_pixels(max_pixels)}; shrink the image, or raise --max-pixels if you trust it")


def check_resized_pixels(size, resized, source, max_pixels=DEFAULT_MAX_PIXELS):
    """Refuse an image that only its resize makes huge: a 3000x1 strip passes ``check_pixels`` and
    becomes 768000x256 at short side 256 (a 60000x1 one, 4 gigapixels)."""
    if max_pixels and resized[0] * resized[1] > max_pixels:
        raise UserError(f"{source}: {size[0]}x{size[1]} pixels is too long and thin: at short side "
                        f"{min(resized)} it would be {resized[0]}x{resized[1]} ({_pixels(resized[0] * resized[1])}, "
                        f"over the limit of {_pixels(max_pixels)}); crop it or remove it")


def to_8bit(image):
    """A 16-bit (or 32-bit integer) greyscale image scaled to 8 bits, not clipped to white by Pillow."""
    if image.mode not in HIGH_BIT_DEPTH:
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def open_rgb(source, max_pixels=DEFAULT_MAX_PIXELS):
    """A path or a PIL image -> an RGB PIL image: the one decoder of prepare, evaluation and search.

    Sizes are checked against ``max_pixels`` before decoding, a photo stored sideways with an EXIF
    orientation tag is turned upright (as viewers show it, and training's decoder does, so it embeds
    like its upright twin), high-bit-depth greyscale is scaled to 8 bits, and any failure names the
    file in one line.
    """
    if isinstance(source, Image.Image):
        check_pixels(source.size, "image", max_pixels)
        return to_8bit(ImageOps.exif_transpose(source)).convert("RGB")
    # Pillow's own guard (warns above its limit, refuses at twice it) follows ours for this call.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels says it in one line
            with Image.open(source) as image:
                check_pixels(image.size, source, max_pixels)
                return to_8bit(ImageOps.exif_transpose(image)).convert("RGB")
    except Image.DecompressionBombError as e:
        raise UserError(f"{source}: over the limit of {_pixels(max_pixels)}; shrink the image, or raise "
                        f"--max-pixels if you trust it") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError(f"{source}: not a readable image ({e}); replace or remove it") from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def preprocess(image, image_size, resize_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               max_pixels=DEFAULT_MAX_PIXELS):
    """RGB PIL image -> float32 array 3 x image_size x image_size, as the model expects; ``max_pixels``
    bounds the resized image (``check_resized_pixels``)."""
    resize_size = resize_size or resize_size_for(image_size)
    width, height = image.size
    if width <= height:  # torchvision's Resize(int): short side exact, long side truncated
        size = (resize_size, int(resize_size * height / width))
    else:
        size = (int(resize_size * width / height), resize_size)
    check_resized_pixels(image.size, size, "image", max_pixels)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))
