"""Training batches as index plans: offline triplets and PK batches, pure functions of (seed, epoch).

A sampler plans a whole epoch in the main process, so DataLoader workers can stay alive between
epochs (``persistent_workers``) and only ever see ``(index, seed)`` keys. Every DDP rank draws the
same plan and takes every world_size-th batch; each image's augmentation seed comes with the plan,
so a run resumed at epoch e repeats exactly what the uninterrupted run did, and ranks (holding
different batches) never share an augmentation stream.

Both samplers yield flat lists of image keys, so both loaders collate ``(images, labels)`` and the
training step is always embed -> mine -> loss (``triplet.mining.packaged_triplets`` for offline
triplets, whose batches are laid out as [anchors, positives, negatives]).
"""
import numpy as np
from torch.utils.data import Sampler

from triplet.data.datasets import class_index, check_triplet_ready, draw_triplets
from triplet.errors import UserError

SEED_LIMIT = 2**62


class EpochBatchSampler(Sampler):
    """The epoch's plan of batches (``plan``, from a seeded generator), this rank's share, and one
    augmentation seed per image; ``set_epoch`` redraws it."""

    stream = 0  # separates the generators of different samplers for the same (seed, epoch)

    def __init__(self, seed=0, rank=0, world_size=1):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.set_epoch(0)

    def plan(self, rng):
        raise NotImplementedError

    def set_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch, self.stream])
        plan = self.plan(rng)
        seeds = rng.integers(0, SEED_LIMIT, size=(len(plan), len(plan[0]) if plan else 0))
        per_rank = len(plan) // self.world_size
        shard = range(self.rank, per_rank * self.world_size, self.world_size)
        self.batches = [[(int(i), int(s)) for i, s in zip(plan[b], seeds[b])] for b in shard]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class TripletBatchSampler(EpochBatchSampler):
    """The study's offline random triplets: every anchor once per epoch, in a shuffled order,
    ``batch_size`` triplets a batch laid out as [anchors, positives, negatives]; the last partial
    batch is dropped."""

    stream = 2

    def __init__(self, labels, batch_size, seed=0, rank=0, world_size=1):
        check_triplet_ready(labels, "training split")
        self.labels, self.batch_size = np.asarray(labels), batch_size
        super().__init__(seed, rank, world_size)

    def plan(self, rng):
        a, p, n = draw_triplets(self.labels, rng)
        order = rng.permutation(len(a))
        steps = len(order) // self.batch_size
        return [np.concatenate([t[chunk] for t in (a, p, n)])
                for chunk in order[:steps * self.batch_size].reshape(steps, self.batch_size)]


class PKSampler(EpochBatchSampler):
    """Batches of P classes x K images each, for online mining; about one pass over the data.

    Each class's images are shuffled and cut into groups of K (the last group topped up with
    other images of the class); batches take one group from each of P distinct classes, drawn
    in proportion to the groups a class has left.
    """

    stream = 1

    def __init__(self, labels, p, k, seed=0, rank=0, world_size=1):
        if k < 2:
            raise UserError(f"--samples-per-class {k}: K must be at least 2 (a positive needs a pair)")
        check_triplet_ready(labels, "training split")
        self.by_class = class_index(labels)
        if p < 2 or p > len(self.by_class):
            raise UserError(f"PK batches need P = batch size / samples per class = {p} classes, between 2 "
                            f"and the {len(self.by_class)} classes of the training split; change "
                            f"--batch-size or --samples-per-class")
        self.p, self.k = p, k
        super().__init__(seed, rank, world_size)

    def plan(self, rng):
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
            batches.append(np.concatenate([groups[int(c)].pop() for c in chosen]))
