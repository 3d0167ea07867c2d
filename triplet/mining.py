"""Triplet miners: pure functions of (embeddings, labels) returning (anchor, positive, negative).

Each miner returns three 1-D int64 index tensors into the batch, on the embeddings' device, so
any miner feeds the one loss in ``triplet.losses``. Distances are Euclidean; a precomputed
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


@torch.no_grad()
def all_triplets(labels, device=None):
    """Every (a, p, n) with label[a] == label[p], a != p, label[n] != label[a]; a-p-n order."""
    device = device or (labels.device if isinstance(labels, torch.Tensor) else "cpu")
    pos, neg = _masks(labels, device)
    a, p, n = torch.nonzero(pos[:, :, None] & neg[:, None, :], as_tuple=True)
    return a, p, n


@torch.no_grad()
def batch_hard(embeddings, labels, dist=None):
    """Per anchor, its farthest positive and nearest negative (Hermans et al., 2017).

    Anchors without a positive or without a negative are skipped; ties go to the lower index.
    """
    dist = distance_matrix(embeddings.detach()) if dist is None else dist.detach()
    pos, neg = _masks(labels, dist.device)
    valid = pos.any(1) & neg.any(1)
    hardest_p = dist.masked_fill(~pos, -float("inf")).argmax(1)
    hardest_n = dist.masked_fill(~neg, float("inf")).argmin(1)
    a = torch.nonzero(valid, as_tuple=True)[0]
    return a, hardest_p[a], hardest_n[a]


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


MINER_NAMES = ("hard", "semihard", "all")


def get_miner(name, margin=1.0):
    """A callable ``(embeddings, labels) -> (a, p, n)`` for "hard", "semihard" or "all"."""
    if name == "hard":
        return batch_hard
    if name == "semihard":
        return lambda embeddings, labels: semihard(embeddings, labels, margin)
    if name == "all":
        return lambda embeddings, labels: all_triplets(labels, embeddings.device)
    raise ValueError(f"unknown miner {name!r}; choose one of {', '.join(MINER_NAMES)}")
