"""Transforms from an image path to a model-ready tensor: training augmentation and evaluation.

Training decodes with ``torchvision.io`` and augments uint8 tensors with transforms v2 (faster
than PIL + transforms v1; docs/speed.md has the measurements). Evaluation calls the
torch-free ``triplet.deploy.preprocess.preprocess`` so the deployed ONNX embedder sees exactly the
same input. Both are small callable classes so DataLoader workers can pickle them.
"""
import re
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from triplet.deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, open_rgb, preprocess, resize_size_for
from triplet.errors import UserError, last_line

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, an extra native dependency;
# they still work and are the fastest measured here, so keep them and silence the notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "resize_size_for", "load_image", "TrainTransform", "EvalTransform"]


class DamagedImage(UserError):
    pass


def load_image(path):
    """Decode any JPEG/PNG to an upright (EXIF orientation applied) 3xHxW uint8 RGB tensor.
    A file of the prepared copy that no longer decodes is named (torchvision's error does not)."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        reason = re.sub(r"^\w+, \S+:\d+, ", "", last_line(e))  # "decode_jpeg, /path/decode_jpeg.cpp:171, Image is ..."
        raise DamagedImage(f"{path}: does not decode ({reason}); delete it and run scripts/prepare_data.py again "
                           f"with the same options (it redoes missing images)") from e


class TrainTransform:
    """RandomResizedCrop + horizontal flip + mild colour jitter, uint8 in and out.

    The ImageNet normalisation happens on the training device (``triplet.engine.to_device``), so
    workers send, pin and copy a quarter of the bytes of a float32 batch.

    ``min_scale``: the smallest crop, as a fraction of the image's area (torchvision's 0.08 by
    default; small or centred objects, such as digits, need a larger one).
    """

    def __init__(self, image_size, min_scale=0.08):
        self.ops = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ])

    def __call__(self, path):
        return self.ops(load_image(path) if not isinstance(path, torch.Tensor) else path)


class EvalTransform:
    """Resize to image_size * 256/224, centre-crop, normalise (shared with ONNX deployment)."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, source):
        return torch.from_numpy(preprocess(open_rgb(source), self.image_size))
