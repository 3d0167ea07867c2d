"""--gpu-cache's batched augmentation, on the CPU (the same tensor code runs on a GPU)."""
import numpy as np
import pytest
import torch

from triplet.data.gpu_cache import GpuCache, KeyDataset, augment_params, crop_box, jitter
from triplet.data.prepare import DataOptions, prepared_dir, read_manifest


def test_crop_boxes_stay_inside_and_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        top, left, h, w = crop_box(height, width, rng, min_scale=0.3)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    assert crop_box(10, 10, np.random.default_rng(1), min_scale=1.0) == (0, 0, 10, 10)  # the whole image
    assert crop_box(10, 40, np.random.default_rng(1), min_scale=1.0) == (0, 13, 10, 13)  # fallback: centred, 4:3


def test_jitter_hand_cases():
    flat = torch.full((1, 3, 2, 2), 100.0)
    assert torch.equal(jitter(flat, np.array([[1.0, 1.0, 1.0]], dtype=np.float32)), flat)
    assert torch.allclose(jitter(flat, np.array([[0.5, 1.0, 1.0]], dtype=np.float32)), flat / 2)
    colour = torch.tensor([200.0, 100.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    grey = jitter(colour, np.array([[1.0, 1.0, 0.0]], dtype=np.float32))  # saturation 0: grey
    assert torch.allclose(grey, torch.full_like(grey, 0.2989 * 200 + 0.587 * 100), atol=1e-3)


def test_jitter_makes_no_host_tensor_per_batch(monkeypatch):
    """On CUDA, torch.tensor(list, device=...) waits for the queue; jitter made its grey weights
    that way twice a batch. They are made once per device and dtype now."""
    images, factors = torch.rand(2, 3, 4, 4) * 255, np.ones((2, 3), dtype=np.float32)
    jitter(images, factors)  # the first batch makes them
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    assert torch.allclose(jitter(images, factors), images, atol=1e-3) and made == []  # factors of 1 change nothing


def test_parameters_are_a_function_of_each_images_seed():
    first = augment_params([(30, 40), (50, 20)], [7, 8])
    again = augment_params([(50, 20)], [8])
    assert first[0][1] == again[0][0] and first[1][1] == again[1][0] and (first[2][1] == again[2][0]).all()


def test_cached_batches_are_normalised_augmented_and_reproducible(synthetic_root):
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "train")
    cache = GpuCache(paths[:6], 32, torch.device("cpu"), progress=False)
    keys = torch.stack([KeyDataset(labels)[(i, 100 + i)][0] for i in range(6)])
    batch = cache(keys, torch.device("cpu"))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < batch.min() < batch.max() < 2.7  # ImageNet-normalised [0, 1]
    assert torch.equal(cache(keys, torch.device("cpu")), batch)
    other = keys.clone()
    other[:, 1] += 1
    assert not torch.equal(cache(other, torch.device("cpu")), batch)


@pytest.mark.parametrize("key", [(3, 5)])
def test_key_dataset_passes_the_key_and_label(key):
    item, label = KeyDataset([0, 1, 2, 9])[key]
    assert item.tolist() == [3, 5] and item.dtype == torch.int64 and label == 9
