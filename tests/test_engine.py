"""The training step's data path: uint8 normalised on the device, few host syncs, a non-finite
loss still stopping the run at the step where it happened."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from triplet import engine, runtime
from triplet.data import gpu_cache
from triplet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from triplet.mining import batch_hard, packaged_triplets

CPU = torch.device("cpu")


def test_uint8_batches_are_normalised_on_the_device_exactly_as_transforms_v2_would():
    images = torch.randint(0, 256, (6, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_device = engine.to_device(images, CPU)
    expected = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(images))
    assert torch.equal(on_device, expected)
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    floats = torch.randn(2, 3, 4, 4)  # evaluation batches arrive normalised
    assert torch.equal(engine.to_device(floats, CPU), floats)


class NanAt(torch.nn.Module):
    """Finite embeddings, except NaN from the ``bad``-th call (1-based) on."""

    def __init__(self, bad):
        super().__init__()
        self.weight, self.calls, self.bad = torch.nn.Parameter(torch.ones(1)), 0, bad

    def forward(self, images):
        self.calls += 1
        out = images.flatten(1)[:, :4] * self.weight
        return out * float("nan") if self.calls >= self.bad else out


def batches(steps, labels=(0,) * 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 2, 2, generator=g), torch.tensor(labels)) for _ in range(steps)]


def run(model, steps, sync_every):
    return engine.train_one_epoch(model, batches(steps), torch.optim.SGD(model.parameters(), lr=0.01), CPU, "fp32",
                                  1.0, packaged_triplets, epoch=1, progress=False, sync_every=sync_every)


def test_the_host_looks_at_the_loss_only_every_few_steps(monkeypatch):
    looks = []
    original = engine._read_at_sync_point
    monkeypatch.setattr(engine, "_read_at_sync_point", lambda losses, *a: looks.append(len(losses)) or original(losses, *a))
    stats = run(NanAt(bad=10**9), steps=7, sync_every=3)
    assert looks == [3, 3, 1]  # two sync points and the epoch's end
    assert stats["train_loss"] > 0 and stats["active_triplets"] >= 0


READS = ["__float__", "__int__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero", "masked_select"]


@pytest.mark.parametrize("miner", [packaged_triplets, batch_hard])
@pytest.mark.parametrize("steps, sync_every", [(6, 3), (7, 3), (2, 10)])
def test_nothing_but_the_sync_points_reads_the_device(monkeypatch, steps, sync_every, miner):
    """On a GPU every read of a device tensor's value makes the host wait for the queue, and so does
    a result whose shape depends on the values (nonzero, a boolean mask index); a CPU run cannot
    see that, so every such call outside _read_at_sync_point is counted here, for offline triplets
    and batch-hard mining.
    (The epoch's active-triplet count used to be read once more at the end: three waits for two
    sync points; batch-hard used nonzero to drop anchors without a triplet: a wait every step.)"""
    inside, stray, sync_points = [False], [], []
    original = engine._read_at_sync_point

    def sync_point(*args):
        sync_points.append(1)
        inside[0] = True
        try:
            return original(*args)
        finally:
            inside[0] = False

    def counting(name):
        method = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not inside[0]:
                stray.append(name)
            return method(self, *args, **kwargs)
        return read

    monkeypatch.setattr(engine, "_read_at_sync_point", sync_point)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    nonzero, getitem = torch.nonzero, torch.Tensor.__getitem__

    def counted_nonzero(*args, **kwargs):
        if not inside[0]:
            stray.append("torch.nonzero")
        return nonzero(*args, **kwargs)

    def masked_getitem(self, index):  # x[mask] is a nonzero in disguise
        parts = index if isinstance(index, tuple) else (index,)
        if not inside[0] and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            stray.append("boolean mask index")
        return getitem(self, index)

    monkeypatch.setattr(torch, "nonzero", counted_nonzero)
    monkeypatch.setattr(torch.Tensor, "__getitem__", masked_getitem)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    data = batches(steps, labels=(0, 0, 1, 1, 2, 2))  # offline: 2 triplets a batch; batch-hard: 6 anchors
    stats = engine.train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.01), CPU, "fp32", 1.0,
                                   miner, progress=False, sync_every=sync_every)
    monkeypatch.undo()
    assert stray == [] and len(sync_points) == -(-steps // sync_every)
    # the count that now travels with the last losses is still the epoch's: active triplets per step
    assert 0 < stats["active_triplets"] <= (2 if miner is packaged_triplets else 6) and stats["train_loss"] > 0


@pytest.mark.parametrize("bad, sync_every", [(5, 3), (1, 50), (7, 7)])
def test_a_non_finite_loss_names_the_epoch_and_its_first_bad_step(bad, sync_every):
    with pytest.raises(engine.NonFiniteLoss, match=f"at epoch 2, step {bad};"):
        run(NanAt(bad), steps=7, sync_every=sync_every)


def test_host_copies_are_asynchronous_only_on_cuda(monkeypatch):
    """On MPS an asynchronous copy can read its source after Python freed it (pytorch#189690), and
    the training step frees its CPU batch at once: only CUDA, whose caching host allocator keeps a
    pinned source alive, may copy without waiting. The meta device stands in for MPS in the step's
    own functions; CUDA and MPS themselves are absent here, so their copies are only recorded."""
    original, copies = torch.Tensor.to, []

    def recording_to(self, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, torch.device) and target.type in ("cuda", "mps"):
            return self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    meta = torch.device("meta")
    assert engine.to_device(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), meta).device == meta
    assert gpu_cache._on_device(np.zeros(3), meta).device == meta
    runtime.host_to_device(torch.zeros(3), torch.device("mps"))
    assert copies and not any(copies)
    runtime.host_to_device(torch.zeros(3), torch.device("cuda", 0))
    assert copies[-1] is True
