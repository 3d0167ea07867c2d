"""Miners and the triplet loss against brute-force loops over every triplet."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from triplet.losses import triplet_loss
from triplet.mining import MINER_NAMES, batch_hard, distance_matrix, get_miner, packaged_triplets, semihard

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ONLINE = [name for name in MINER_NAMES if name != "none"]


def batch(n=24, dim=5, classes=4, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    if integer:  # a small grid: many exactly equal distances
        return torch.randint(0, 3, (n, dim), generator=g).float(), labels
    return torch.randn(n, dim, generator=g), labels


def brute_triplets(labels):
    labels = labels.tolist()
    return [(a, p, n) for a, p, n in itertools.product(range(len(labels)), repeat=3)
            if a != p and labels[a] == labels[p] and labels[n] != labels[a]]


def as_list(triplets):
    return list(zip(*(t.tolist() for t in triplets)))


def check_dtypes(triplets, device):
    for t in triplets:
        assert t.dtype == torch.int64 and t.dim() == 1 and t.device.type == device


def test_packaged_triplets_are_the_thirds_of_the_batch():
    x = torch.randn(6, 2, requires_grad=True)
    assert as_list(packaged_triplets(x)) == [(0, 2, 4), (1, 3, 5)]
    assert as_list(get_miner("none")(x, torch.tensor([9, 9, 9, 9, 9, 9]))) == [(0, 2, 4), (1, 3, 5)]
    check_dtypes(packaged_triplets(x), "cpu")
    with pytest.raises(ValueError, match="3B embeddings, got 5"):
        packaged_triplets(x[:5])


@pytest.mark.parametrize("integer", [False, True])
def test_batch_hard_matches_brute_force(integer):
    x, labels = batch(integer=integer)
    labels[0] = 99  # an anchor without positives gets the placeholder (0, 0, 0)
    dist = distance_matrix(x)
    expected = []
    for a in range(len(labels)):
        pos = [(dist[a, p].item(), p) for p in range(len(labels))
               if p != a and labels[p] == labels[a]]
        neg = [(dist[a, n].item(), n) for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            hardest_p = max(pos, key=lambda dp: (dp[0], -dp[1]))[1]  # ties: lower index
            hardest_n = min(neg)[1]
            expected.append((a, hardest_p, hardest_n))
        else:
            expected.append((a, a, a))
    assert expected[0] == (0, 0, 0)
    assert as_list(batch_hard(x, labels, dist=dist)) == expected
    assert as_list(batch_hard(x, labels)) == expected


def test_batch_hard_hand_case():
    # 1-D points; classes A = {0, 1, 3}, B = {2, 4}.
    x = torch.tensor([[0.0], [1.0], [2.5], [4.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    # a=0: pos 1 (1), 3 (4) -> 3; neg 2 (2.5), 4 (10) -> 2.   a=1: pos 3 (3); neg 2 (1.5).
    # a=2: pos 4 (7.5); neg 1 and 3 tie at 1.5 -> 1.  a=3: pos 0 (4); neg 2 (1.5).
    # a=4: pos 2 (7.5); neg 3 (6).
    assert as_list(batch_hard(x, labels)) == [(0, 3, 2), (1, 3, 2), (2, 4, 1), (3, 0, 2), (4, 2, 3)]


@pytest.mark.parametrize("margin", [0.3, 1.0])
def test_semihard_matches_brute_force(margin):
    x, labels = batch(n=30)
    dist = distance_matrix(x)
    expected = [(a, p, n) for a, p, n in brute_triplets(labels)
                if dist[a, p] < dist[a, n] < dist[a, p] + margin]
    assert expected  # the case is not vacuous
    assert as_list(semihard(x, labels, margin, dist=dist)) == expected
    assert as_list(get_miner("semihard", margin)(x, labels)) == expected


def test_semihard_hand_case():
    x = torch.tensor([[0.0], [1.0], [1.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # d(0,1)=1: n=2 at 1.5 is in (1, 2); n=3 at 3 is not. d(1,0)=1: n=2 at 0.5 is not; n=3 at 2 is
    # not (strict). d(2,3)=1.5: n=1 at 0.5 no, n=0 at 1.5 no. d(3,2)=1.5: n=1 at 2 yes, n=0 at 3 no.
    assert as_list(semihard(x, labels, margin=1.0)) == [(0, 1, 2), (3, 2, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ONLINE)
def test_miners_return_int64_indices_without_grad(name, device):
    x, labels = batch()
    x = x.to(device).requires_grad_()
    triplets = get_miner(name, margin=0.5)(x, labels.to(device))
    check_dtypes(triplets, device)
    assert len(triplets[0]) > 0
    a, p, n = (t.cpu() for t in triplets)
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert x.grad is None and torch.is_grad_enabled()  # grad mode is restored


def test_miners_on_a_batch_with_one_class_give_no_loss():
    """semihard finds no triplet; batch_hard keeps one placeholder (a, a, a) per anchor, so the
    shape of what it returns never depends on the values."""
    x, labels = torch.randn(6, 3, requires_grad=True), torch.zeros(6, dtype=torch.int64)
    assert all(len(t) == 0 for t in semihard(x, labels))
    assert as_list(batch_hard(x, labels)) == [(a, a, a) for a in range(6)]
    for name in ONLINE:
        triplets = get_miner(name)(x, labels)
        check_dtypes(triplets, "cpu")
        loss, active = triplet_loss(x, *triplets)
        assert loss.item() == 0.0 and active.item() == 0 and loss.requires_grad
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


def test_triplet_loss_ignores_placeholders():
    """A batch-hard result with placeholders gives the loss, count and gradient of its real
    triplets alone: their mean, not diluted by the anchors that had no triplet."""
    x, labels = batch()
    labels[:3] = torch.tensor([97, 98, 99])  # three anchors without a positive
    triplets = batch_hard(x, labels)
    real = triplets[0] != triplets[1]
    assert real.sum() == len(labels) - 3
    gradients, results = [], []
    for chosen in (triplets, [t[real] for t in triplets]):
        leaf = x.clone().requires_grad_()
        loss, active = triplet_loss(leaf, *chosen, margin=1.0)
        loss.backward()
        results.append((loss.item(), active.item()))
        gradients.append(leaf.grad)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6) and results[0][1] == results[1][1] > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-7)


def test_unknown_miner_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown miner 'easy'"):
        get_miner("easy")


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_loss_matches_brute_force(margin):
    x, labels = batch()
    x.requires_grad_()
    a, p, n = (torch.tensor(t) for t in zip(*brute_triplets(labels)))
    loss, active = triplet_loss(x, a, p, n, margin=margin)
    xd = x.detach().double()
    per = [max(float((xd[i] - xd[j] + 1e-6).norm() - (xd[i] - xd[k] + 1e-6).norm()) + margin, 0)
           for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())]
    assert loss.item() == pytest.approx(sum(per) / len(per), rel=1e-5)
    assert active.item() == sum(v > 0 for v in per) and active.dtype == torch.int64 and active.dim() == 0
    expected = F.triplet_margin_loss(x[a], x[p], x[n], margin=margin)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_triplet_loss_hand_case():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    idx = [torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([2, 1])]
    # (0,1,2): 5 - 10 + 1 -> 0; (0,2,1): 10 - 5 + 1 = 6. Mean 3, one active (eps is negligible).
    loss, active = triplet_loss(x, *idx, margin=1.0)
    assert loss.item() == pytest.approx(3.0, abs=1e-4) and active.item() == 1


def test_triplet_loss_without_triplets_is_zero_and_in_the_graph():
    x = torch.randn(4, 3, requires_grad=True)
    empty = torch.empty(0, dtype=torch.int64)
    loss, active = triplet_loss(x, empty, empty, empty)
    assert loss.item() == 0.0 and active.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_the_loss_gradient_is_the_same_on_every_run_with_several_threads():
    """Mined triplets pick a row many times; its gradients must be summed in a fixed order.

    Indexing's backward (index_put_ with accumulate) adds them with parallel atomics on a
    multi-core CPU, so two training runs with the same seed drifted apart under online mining.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        embeddings = torch.randn(64, 128, generator=generator)
        a, p, n = (torch.randint(0, 64, (4000,), generator=generator) for _ in range(3))

        def gradient():
            x = embeddings.clone().requires_grad_()
            triplet_loss(x, a, p, n, margin=0.2)[0].backward()
            return x.grad

        first = gradient()
        assert all(torch.equal(first, gradient()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
