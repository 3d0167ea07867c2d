"""The triplet margin loss on mined index triplets, shared by every miner.

A miner picks ``(anchor, positive, negative)`` indices without gradient; the loss gathers those
rows from the embeddings and applies ``F.triplet_margin_loss`` (Euclidean, eps=1e-6), so the
gradient flows only through the chosen rows. The count of active triplets (positive loss) is
returned as well, because a falling count is the clearest sign that mining has run dry.
"""
import torch.nn.functional as F


def triplet_loss(embeddings, anchor, positive, negative, margin=1.0):
    """Mean of relu(d(a,p) - d(a,n) + margin) over the triplets, and how many are active.

    The count is a 0-d int64 tensor on the embeddings' device, so the training loop can add it
    up without waiting for the device. A triplet whose positive is its anchor is a miner's
    placeholder (``batch_hard`` keeps one row per anchor, so its shape never makes the host
    wait): it adds nothing to the mean or the count. With no triplets the same sum over no rows
    gives zero, still in the graph, so ``backward()`` and DDP gradient sync work unchanged.
    """
    # index_select, not embeddings[anchor]: its backward adds the gradients of a row picked many
    # times in a fixed order (index_add_), where indexing's backward on a multi-core CPU adds them
    # with parallel atomics, so two runs with the same seed drifted apart under online mining.
    rows = [embeddings.index_select(0, index) for index in (anchor, positive, negative)]
    real = anchor != positive
    per_triplet = F.triplet_margin_loss(*rows, margin=margin, reduction="none") * real
    return per_triplet.sum() / real.sum().clamp(min=1), (per_triplet > 0).sum()
