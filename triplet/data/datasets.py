"""Datasets and samplers over a prepared split: single images, offline triplets, PK batches.

Randomness is always a function of (seed, epoch): a run resumed at epoch e draws exactly the
triplets and batches the uninterrupted run drew, and every DDP rank draws the same epoch plan
before taking its own shard.
"""
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from triplet.errors import UserError


def _class_index(labels):
    """{class: np.array of positions}; classes in sorted order so draws are reproducible."""
    index = defaultdict(list)
    for position, label in enumerate(labels):
        index[int(label)].append(position)
    return {c: np.asarray(index[c]) for c in sorted(index)}


def check_triplet_ready(labels, what="split"):
    """Fail early (not hours into training) when a split cannot give every anchor a triplet."""
    by_class = _class_index(labels)
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
    by_class = _class_index(labels)
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
    """(image, class id) pairs; the unit of embedding and of PK batches. ``transform``: path -> tensor."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.paths[i]), self.labels[i]


class TripletCUBDataset(Dataset):
    """Item i is (anchor i, a positive of its class other than i, a negative) and their labels.

    The study's offline random triplets: redrawn each epoch by ``set_epoch`` from (seed, epoch);
    ``fixed=True`` keeps one deterministic draw, for evaluation.
    """

    def __init__(self, paths, labels, transform, seed=0, fixed=False):
        check_triplet_ready(labels)
        self.paths, self.labels, self.transform = list(paths), list(labels), transform
        self.seed, self.fixed = seed, fixed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        if self.fixed:
            self.triplets = fixed_triplets(self.labels, self.seed)
        else:
            self.triplets = draw_triplets(self.labels, np.random.default_rng([self.seed, epoch]))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        a, p, n = (int(t[i]) for t in self.triplets)
        images = [self.transform(self.paths[j]) for j in (a, p, n)]
        return (*images, torch.tensor([self.labels[a], self.labels[p], self.labels[n]]))


class PKSampler(Sampler):
    """Batches of P classes x K images each, for online mining; about one pass over the data.

    Each class's images are shuffled and cut into groups of K (the last group topped up with
    other images of the class); batches take one group from each of P distinct classes, drawn
    in proportion to the groups a class has left. With DDP each rank takes every world_size-th
    batch of the same plan.
    """

    def __init__(self, labels, p, k, seed=0, rank=0, world_size=1):
        if k < 2:
            raise UserError(f"--samples-per-class {k}: K must be at least 2 (a positive needs a pair)")
        check_triplet_ready(labels, "training split")
        self.by_class = _class_index(labels)
        if p < 2 or p > len(self.by_class):
            raise UserError(f"PK batches need P = batch size / samples per class = {p} classes, between 2 "
                            f"and the {len(self.by_class)} classes of the training split; change "
                            f"--batch-size or --samples-per-class")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.set_epoch(0)

    def _plan(self, rng):
        groups = {}
        for c, members in self.by_class.items():
            order = rng.permutation(members)
            tail = len(order) % self.k
            if tail:  # top up the last group, with images outside it where the class has them
                pool = order[:-tail] if len(order) > self.k else order
                fill = rng.choice(pool, self.k - tail, replace=len(pool) < self.k - tail)
                order = np.concatenate([order, fill])
            groups[c] = list(order.reshape(-1, self.k))
        batches = []
        while True:
            classes = [c for c in groups if groups[c]]
            if len(classes) < self.p:
                return batches
            weights = np.array([len(groups[c]) for c in classes], dtype=float)
            chosen = rng.choice(classes, size=self.p, replace=False, p=weights / weights.sum())
            batches.append([int(i) for c in chosen for i in groups[int(c)].pop()])

    def set_epoch(self, epoch):
        plan = self._plan(np.random.default_rng([self.seed, epoch, 1]))
        per_rank = len(plan) // self.world_size
        self.batches = plan[self.rank::self.world_size][:per_rank]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
