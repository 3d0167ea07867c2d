"""Datasets, triplet drawing and PK batches."""
from collections import Counter

import numpy as np
import pytest
import torch

from triplet.data.datasets import ImageDataset, draw_triplets, fixed_triplets
from triplet.data.samplers import PKSampler, TripletBatchSampler
from triplet.errors import UserError
from triplet.data.prepare import DataOptions, prepared_dir, read_manifest
from triplet.data.transforms import EvalTransform, TrainTransform, load_image, resize_size_for
from triplet.engine import make_loader

LABELS = [1] * 5 + [2] * 3 + [3] * 2 + [7] * 6


def test_triplet_invariants_hold_over_many_draws():
    labels = np.array(LABELS)
    for seed in range(200):
        a, p, n = draw_triplets(labels, np.random.default_rng(seed))
        assert (a == np.arange(len(labels))).all()
        assert (labels[p] == labels[a]).all() and (p != a).all()
        assert (labels[n] != labels[a]).all()


def test_draws_are_deterministic_by_seed_and_vary_by_epoch():
    labels = np.array(LABELS)
    first = draw_triplets(labels, np.random.default_rng([3, 0]))
    again = draw_triplets(labels, np.random.default_rng([3, 0]))
    other = draw_triplets(labels, np.random.default_rng([3, 1]))
    assert all((x == y).all() for x, y in zip(first, again))
    assert any((x != y).any() for x, y in zip(first[1:], other[1:]))
    assert all((x == y).all() for x, y in zip(fixed_triplets(labels, 5), fixed_triplets(labels, 5)))


def indices(sampler):
    return [[i for i, _ in batch] for batch in sampler]


def test_triplet_batches_are_anchors_positives_negatives_of_one_epoch_draw():
    labels = np.array(LABELS)
    sampler = TripletBatchSampler(labels, batch_size=5, seed=3)
    batches = indices(sampler)
    assert len(sampler) == len(batches) == len(labels) // 5
    anchors = []
    for batch in batches:
        a, p, n = np.array(batch).reshape(3, 5)
        assert (labels[p] == labels[a]).all() and (p != a).all() and (labels[n] != labels[a]).all()
        anchors += a.tolist()
    assert len(set(anchors)) == len(anchors) == 15  # every anchor at most once; the partial batch dropped
    seeds = [s for batch in sampler for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every image its own augmentation stream


def test_sampler_plans_are_pure_functions_of_seed_and_epoch_and_shard_by_rank():
    labels = np.array(LABELS * 4)
    first, again = TripletBatchSampler(labels, 4, seed=1), TripletBatchSampler(labels, 4, seed=1)
    again.set_epoch(3)
    again.set_epoch(0)  # a resumed run that sets epoch 0 again draws what the first run drew
    assert list(first) == list(again)
    again.set_epoch(1)
    assert indices(first) != indices(again)
    ranks = [TripletBatchSampler(labels, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(first) // 2
    # rank r takes every second batch of the one plan, augmentation seeds included
    assert [b for pair in zip(ranks[0], ranks[1]) for b in pair] == first.batches[:2 * len(ranks[0])]


def test_a_seeded_key_gives_the_same_augmentation_anywhere_and_leaves_the_caller_rng_alone(synthetic_root):
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "train")
    dataset = ImageDataset(paths, labels, TrainTransform(32))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, label = dataset[(3, 12345)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    assert torch.equal(dataset[(3, 12345)][0], first) and label == labels[3]
    assert not torch.equal(dataset[(3, 54321)][0], first)
    assert first.dtype == torch.uint8 and first.shape == (3, 32, 32)  # normalised on the device


def test_batches_are_the_same_loaded_between_steps_or_by_a_worker(synthetic_root):
    """A small CPU loads in the main process (``runtime.default_workers``), with all its threads;
    a worker has one. The run must not depend on which: same keys, same pixels."""
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "train")
    dataset = ImageDataset(paths, labels, TrainTransform(40))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = {workers: [images for images, _ in make_loader(dataset, torch.device("cpu"), workers,
                                                                  batch_sampler=TripletBatchSampler(labels, 4))]
                   for workers in (0, 1)}
    finally:
        torch.set_num_threads(threads)
    assert len(batches[0]) == len(batches[1]) > 1
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1]))


def test_persistent_workers_load_each_epochs_new_plan_as_a_fresh_loader_would(synthetic_root):
    """Training keeps its workers between epochs (``persistent=True``); the sampler plans each
    epoch in the main process, so a kept worker must load exactly what a fresh one would after a
    resume at that epoch."""
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "train")
    dataset = ImageDataset(paths, labels, TrainTransform(32))

    def loader_at(epoch, persistent):
        sampler = TripletBatchSampler(labels, 4, seed=3)
        sampler.set_epoch(epoch)
        return sampler, make_loader(dataset, torch.device("cpu"), 1, batch_sampler=sampler, persistent=persistent)

    sampler, kept = loader_at(0, persistent=True)
    epoch0 = [images for images, _ in kept]
    workers = kept._iterator
    sampler.set_epoch(1)
    epoch1 = [images for images, _ in kept]
    assert kept.persistent_workers and kept._iterator is workers  # the same worker processes
    fresh = [images for images, _ in loader_at(1, persistent=False)[1]]
    assert len(epoch1) == len(fresh) > 1 and all(torch.equal(a, b) for a, b in zip(epoch1, fresh))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))  # a new plan, not epoch 0 again


def test_a_class_with_one_image_is_refused():
    with pytest.raises(UserError, match="class 9 with a single image"):
        TripletBatchSampler([1, 1, 1, 9], batch_size=2)


def test_pk_sampler_batches_hold_p_classes_of_k_images():
    labels = [c for c in range(10) for _ in range(8 + c)]  # uneven classes, 125 images
    sampler = PKSampler(labels, p=4, k=3, seed=0)
    seen = Counter()
    for batch in indices(sampler):
        classes = Counter(labels[i] for i in batch)
        assert len(batch) == 12 and len(classes) == 4 and set(classes.values()) == {3}
        for c in classes:  # no image twice within a class group unless the class is too small
            members = [i for i in batch if labels[i] == c]
            assert len(set(members)) == 3
        seen.update(batch)
    assert len(sampler) == len(list(sampler)) and all(isinstance(s, int) for _, s in sampler.batches[0])
    assert len(seen) / len(labels) > 0.85  # about one pass over the data
    assert max(seen.values()) <= 2


def test_pk_sampler_is_deterministic_and_shards_by_rank():
    labels = [c for c in range(8) for _ in range(10)]
    a, b = PKSampler(labels, 4, 2, seed=1), PKSampler(labels, 4, 2, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    ranks = [PKSampler(labels, 4, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(b) // 2
    assert not set(map(tuple, indices(ranks[0]))) & set(map(tuple, indices(ranks[1])))


def test_pk_sampler_tops_up_classes_smaller_than_k():
    labels = [0, 0, 1, 1, 1, 2, 2]
    batches = indices(PKSampler(labels, p=2, k=4, seed=0))
    assert batches and all(len(b) == 8 for b in batches)


@pytest.mark.parametrize("p, k, message", [(20, 2, "between 2 and the 3 classes"), (2, 1, "K must be at least 2")])
def test_pk_sampler_refuses_impossible_batches(p, k, message):
    with pytest.raises(UserError, match=message):
        PKSampler([0, 0, 1, 1, 2, 2], p=p, k=k)


def test_grayscale_images_come_out_three_channel(synthetic_root):
    from PIL import Image
    gray = [p for p in sorted((synthetic_root / "CUB_200_2011" / "images").rglob("*.jpg"))
            if Image.open(p).mode == "L"]
    assert gray, "the synthetic set should contain grayscale images"
    image = load_image(gray[0])
    assert image.shape[0] == 3 and image.dtype == torch.uint8
    assert EvalTransform(32)(gray[0]).shape == (3, 32, 32)
    assert TrainTransform(32)(image).shape == (3, 32, 32)
    assert TrainTransform(32).ops.transforms[0].scale == (0.08, 1.0)  # torchvision's RandomResizedCrop default
    assert TrainTransform(32, min_scale=0.5).ops.transforms[0].scale == (0.5, 1.0)  # --crop-scale


def test_image_dataset_and_transform_sizes(synthetic_root):
    paths, labels = read_manifest(prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48)), "test")
    image, label = ImageDataset(paths, labels, EvalTransform(40))[0]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32 and label == labels[0]
    assert resize_size_for(224) == 256


@pytest.mark.parametrize("workers", [0, 1])
def test_a_prepared_image_that_no_longer_decodes_is_named_in_one_line(data_copy, tmp_path, workers):
    """A truncated JPEG in the prepared copy was torchvision's "Image is incomplete or truncated"
    traceback, naming no file, with or without a loader worker."""
    from tests.conftest import call_script
    from triplet.data.prepare import prepare

    prepared = prepare(DataOptions(data_dir=str(data_copy), resize=48), workers=1, log=lambda *a: None)
    data_dir, victim = data_copy, read_manifest(prepared, "train")[0][0]
    victim = victim if hasattr(victim, "write_bytes") else __import__("pathlib").Path(victim)
    victim.write_bytes(victim.read_bytes()[:200])
    status, output = call_script("train", "--data-dir", data_dir, "--resize", 48, "--weights", "none", "--image-size", 32,
                                 "--epochs", 1, "--batch-size", 16, "--workers", workers, "--no-progress",
                                 "--out", tmp_path / "run")
    error = output.strip().splitlines()[-1]  # the lines before it: the start of the run, on stdout
    assert status == 2 and "Traceback" not in output and error.startswith(("train.py: error: ", "__main__.py: error: "))
    assert f"{victim}: does not decode (Image is incomplete or truncated)" in error and "prepare_data.py again" in error
