"""``--gpu-cache``: the training images decoded once and kept (uint8) on the device, whole batches
augmented there, so an epoch is not bound by CPU decoding (all of CUB at short side 256 is about 3 GB).

The loader then carries only ``(index, seed)`` keys (``KeyDataset``); ``GpuCache`` turns a batch
of keys into model input. Augmentation parameters are drawn on the host from each key's seed, as
``TrainTransform`` draws them (RandomResizedCrop's boxes, a flip, colour-jitter factors), so the
run stays a pure function of (seed, epoch); the pixels are computed on the device: one antialiased
resize per image (images differ in size), then flip, jitter and normalisation as batched tensor ops.
Jitter works on floats without rounding to uint8 between its steps, so values differ from the
worker path's by up to about one grey level.
"""
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from triplet.data.transforms import load_image
from triplet.runtime import host_to_device

JITTER = 0.2  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER], as TrainTransform
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


class KeyDataset(Dataset):
    """Item ``(index, seed)`` -> (that key as an int64 pair, label): the cache does the rest."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i, seed = key
        return torch.tensor([i, seed], dtype=torch.int64), self.labels[i]


def crop_box(height, width, rng, min_scale=0.08, ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as ``RandomResizedCrop.get_params`` draws them: ten tries at a random area
    and aspect ratio, then the largest centred crop within the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(sizes, seeds, min_scale=0.08):
    """Per image: its crop box, whether it is flipped, and its (brightness, contrast, saturation)
    factors, each from a generator seeded by the image's own seed."""
    boxes, flips, factors = [], [], []
    for (height, width), seed in zip(sizes, seeds):
        rng = np.random.default_rng(int(seed))
        boxes.append(crop_box(height, width, rng, min_scale))
        flips.append(rng.random() < 0.5)
        factors.append(rng.uniform(1 - JITTER, 1 + JITTER, size=3))
    return boxes, np.array(flips), np.array(factors, dtype=np.float32)


def _on_device(array, device):
    """A small host array on ``device`` without making the host wait for the device's queue
    (a pageable copy would): pinned first on CUDA, then copied asynchronously."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return host_to_device(tensor, device)


@lru_cache(maxsize=None)
def _grey_weights(device, dtype):
    """Made once per device: a list turned into a CUDA tensor is a host-to-device copy that waits
    for the queue, and jitter needs the weights twice a batch."""
    return torch.tensor(GREY, device=device, dtype=dtype).view(1, 3, 1, 1)


def _grey(images):
    return (images * _grey_weights(images.device, images.dtype)).sum(1, keepdim=True)


def jitter(images, factors):
    """Brightness, contrast and saturation on a float batch in [0, 255], as batched blends."""
    factors = _on_device(factors, images.device)
    b, c, s = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
    images = (images * b).clamp_(0, 255)
    mean = _grey(images).mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * c + mean).clamp_(0, 255)
    grey = _grey(images)
    return ((images - grey) * s + grey).clamp_(0, 255)


class GpuCache:
    """The decoded training images on ``device``; ``cache(keys, device)`` -> a normalised,
    augmented channels_last batch (the ``prepare`` step of ``engine.train_one_epoch``)."""

    def __init__(self, paths, image_size, device, min_scale=0.08, progress=True):
        from tqdm import tqdm

        self.image_size, self.min_scale = image_size, min_scale
        self.images = [load_image(p).to(device) for p in tqdm(paths, desc="cache", unit="img", leave=False,
                                                              disable=not progress)]
        self.sizes = [tuple(image.shape[1:]) for image in self.images]

    def __call__(self, keys, device):
        from triplet.engine import to_device

        indices, seeds = keys[:, 0].tolist(), keys[:, 1].tolist()
        boxes, flips, factors = augment_params([self.sizes[i] for i in indices], seeds, self.min_scale)
        size = (self.image_size, self.image_size)
        crops = torch.cat([F.interpolate(self.images[i][None, :, top:top + h, left:left + w].float(), size,
                                         mode="bilinear", antialias=True, align_corners=False)
                           for i, (top, left, h, w) in zip(indices, boxes)])
        flip = _on_device(flips, crops.device).view(-1, 1, 1, 1)
        crops = torch.where(flip, crops.flip(-1), crops)
        images = jitter(crops, factors).round_().to(torch.uint8)
        return to_device(images, device)
