"""Images of a prepared split and the triplets drawn over them (batches: ``triplet.data.samplers``)."""
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from triplet.errors import UserError


def class_index(labels):
    """{class: np.array of positions}; classes in sorted order so draws are reproducible."""
    index = defaultdict(list)
    for position, label in enumerate(labels):
        index[int(label)].append(position)
    return {c: np.asarray(index[c]) for c in sorted(index)}


def check_triplet_ready(labels, what="split"):
    """Fail early (not hours into training) when a split cannot give every anchor a triplet."""
    by_class = class_index(labels)
    if len(by_class) < 2:
        raise UserError(f"the {what} has {len(labels)} images in {len(by_class)} class(es); "
                        f"triplets need at least two classes")
    lonely = [c for c, members in by_class.items() if len(members) < 2]
    if lonely:
        raise UserError(f"the {what} has class {lonely[0]} with a single image (and {len(lonely) - 1} "
                        f"more such classes); triplets need two images of a class")


def draw_triplets(labels, rng):
    """For every anchor i: a positive of its class other than i and a negative of another class."""
    labels = np.asarray(labels)
    by_class = class_index(labels)
    positives = np.empty(len(labels), dtype=np.int64)
    negatives = np.empty(len(labels), dtype=np.int64)
    everyone = np.arange(len(labels))
    for c, members in by_class.items():
        # Offset in 1..n-1 within the class: never the anchor itself.
        offsets = rng.integers(1, len(members), size=len(members))
        order = np.arange(len(members))
        positives[members] = members[(order + offsets) % len(members)]
        others = everyone[labels != c]
        negatives[members] = others[rng.integers(0, len(others), size=len(members))]
    return np.arange(len(labels)), positives, negatives


def fixed_triplets(labels, seed=0):
    """The deterministic evaluation triplets (the study's test triplets), as index arrays."""
    return draw_triplets(labels, np.random.default_rng([seed, 2**31 - 1]))


class ImageDataset(Dataset):
    """(image, class id) pairs; the unit of embedding and of every training batch.

    ``transform``: path -> tensor. A key is an index, or ``(index, seed)`` from a training sampler:
    the augmentation is then drawn from that seed alone, so it is the same in any worker, with any
    number of workers, on every resume, and each DDP rank (holding other batches) has its own.
    """

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.transform(self.paths[key]), self.labels[key]
        i, seed = key
        # Only the CPU generator, which the transforms draw from; saved and restored so the caller's
        # stream is left as it was (torch.random.fork_rng also visits every device backend, per image).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(self.paths[i]), self.labels[i]
        finally:
            generator.set_state(state)
