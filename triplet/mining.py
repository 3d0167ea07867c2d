"""Triplet miners: pure functions of (embeddings, labels) returning (anchor, positive, negative).

Each miner returns three 1-D int64 index tensors into the batch, on the embeddings' device, so
any miner feeds the one loss in ``triplet.losses``; a triplet whose positive is its anchor is a
placeholder the loss ignores. Distances are Euclidean; a precomputed
distance matrix can be passed instead. Mining runs under ``torch.no_grad``: the indices are a
choice, and gradients flow only through the loss that gathers the rows again. Everything is
vectorised masks over the batch (an (anchor, positive) x negative mask at most), no Python loops.
"""
import torch


def distance_matrix(embeddings):
    """Pairwise Euclidean distances of the rows, B x B."""
    return torch.cdist(embeddings, embeddings)


def _masks(labels, device):
    """(positive, negative) B x B masks: same label other than self, different label."""
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=device)
    return same & ~eye, ~same


def _empty(device):
    e = torch.empty(0, dtype=torch.int64, device=device)
    return e, e.clone(), e.clone()


def packaged_triplets(embeddings, labels=None):
    """Offline triplets, already packaged by the sampler: a batch of 3B is [anchors, positives,
    negatives], so triplet i is (i, B + i, 2B + i) (pytorch-metric-learning's
    ``EmbeddingsAlreadyPackagedAsTriplets``). Needs no labels and never waits for the device."""
    count = len(embeddings)
    if count % 3:
        raise ValueError(f"packaged triplets need a batch of 3B embeddings, got {count}")
    a = torch.arange(count // 3, device=embeddings.device)
    return a, a + count // 3, a + 2 * (count // 3)


@torch.no_grad()
def batch_hard(embeddings, labels, dist=None):
    """Per anchor, its farthest positive and nearest negative (Hermans et al., 2017).

    Every row is an anchor, so the result's shape never depends on the values and the host never
    waits for the device to learn it. An anchor without a positive or without a negative gets the
    placeholder ``(a, a, a)``, which ``triplet_loss`` ignores. Ties go to the lower index.
    """
    dist = distance_matrix(embeddings.detach()) if dist is None else dist.detach()
    pos, neg = _masks(labels, dist.device)
    valid = pos.any(1) & neg.any(1)
    a = torch.arange(len(dist), device=dist.device)
    hardest_p = torch.where(valid, dist.masked_fill(~pos, -float("inf")).argmax(1), a)
    hardest_n = torch.where(valid, dist.masked_fill(~neg, float("inf")).argmin(1), a)
    return a, hardest_p, hardest_n


@torch.no_grad()
def semihard(embeddings, labels, margin=1.0, dist=None):
    """All (a, p, n) with d(a,p) < d(a,n) < d(a,p) + margin (FaceNet's semi-hard negatives).

    These are the negatives farther than the positive that still give a positive loss.
    """
    dist = distance_matrix(embeddings.detach()) if dist is None else dist.detach()
    pos, neg = _masks(labels, dist.device)
    a, p = torch.nonzero(pos, as_tuple=True)
    d_ap = dist[a, p][:, None]
    d_an = dist[a]
    keep = neg[a] & (d_an > d_ap) & (d_an < d_ap + margin)
    pair, n = torch.nonzero(keep, as_tuple=True)
    return a[pair], p[pair], n


MINER_NAMES = ("none", "semihard", "hard")


def get_miner(name, margin=1.0):
    """The ``(embeddings, labels) -> (a, p, n)`` callable of a ``--mining`` choice: "none" (the
    study's offline triplets, packaged by the sampler), "semihard" or "hard" (in PK batches)."""
    if name == "none":
        return packaged_triplets
    if name == "hard":
        return batch_hard
    if name == "semihard":
        return lambda embeddings, labels: semihard(embeddings, labels, margin)
    raise ValueError(f"unknown miner {name!r}; choose one of {', '.join(MINER_NAMES)}")
