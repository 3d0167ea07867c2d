import hashlib
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from triplet.data.cub import md5sum
from triplet.data.layout import pack_archive
from triplet.errors import UserError
from triplet.data.synthetic import MAX_CLASSES, class_name, class_spec, image_shape, make_synthetic_cub

CLASSES, PER_CLASS, SIZE = 5, 6, 32


def read_table(root, name):
    return [line.split() for line in (root / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_cub(tmp_path_factory.mktemp("data"), classes=CLASSES,
                              per_class=PER_CLASS, image_size=SIZE, seed=3,
                              grayscale_fraction=0.2)


def test_layout(root):
    assert root.name == "CUB_200_2011"
    for name in ("classes.txt", "images.txt", "image_class_labels.txt",
                 "train_test_split.txt", "bounding_boxes.txt", "README"):
        assert (root / name).is_file(), name
    assert (root / "README").read_text().startswith("SYNTHETIC")
    assert not any(p.name.endswith(".tmp") for p in root.parent.rglob("*"))
    assert len(list((root / "images").iterdir())) == CLASSES


def test_metadata_is_consistent(root):
    classes = {int(i): folder for i, folder in read_table(root, "classes.txt")}
    assert sorted(classes) == list(range(1, CLASSES + 1))
    for i, folder in classes.items():
        assert re.fullmatch(r"\d{3}\.[A-Za-z]+(_[A-Za-z]+)+", folder)
        assert folder.startswith(f"{i:03d}.")
    images = read_table(root, "images.txt")
    labels = dict(read_table(root, "image_class_labels.txt"))
    split = dict(read_table(root, "train_test_split.txt"))
    boxes = {row[0]: row[1:] for row in read_table(root, "bounding_boxes.txt")}
    ids = [row[0] for row in images]
    assert ids == [str(i) for i in range(1, CLASSES * PER_CLASS + 1)]
    assert set(labels) == set(split) == set(boxes) == set(ids)
    w, h = image_shape(SIZE)
    for image_id, rel in images:
        folder, file = rel.split("/")
        assert folder == classes[int(labels[image_id])]
        assert re.fullmatch(r"[A-Za-z_]+_\d{4}_\d+\.jpg", file)
        with Image.open(root / "images" / rel) as img:
            assert img.format == "JPEG" and img.size == (w, h)
        assert all(re.fullmatch(r"\d+\.\d", s) for s in boxes[image_id])
        x, y, bw, bh = map(float, boxes[image_id])
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        assert bw >= 4 and bh >= 4


def test_boxes_vary_in_position_and_size(root):
    w, h = image_shape(SIZE)
    boxes = np.array([list(map(float, b[1:])) for b in read_table(root, "bounding_boxes.txt")])
    assert len({tuple(b) for b in boxes}) > len(boxes) // 2
    area = boxes[:, 2] * boxes[:, 3] / (w * h)
    assert 0.1 < area.mean() < 0.6 and area.std() > 0.02


def test_every_class_has_train_and_test_images(root):
    labels = dict(read_table(root, "image_class_labels.txt"))
    for k in range(1, CLASSES + 1):
        flags = [int(f) for i, f in read_table(root, "train_test_split.txt") if labels[i] == str(k)]
        assert sum(flags) >= 2 and len(flags) - sum(flags) >= 2


def test_some_images_are_grayscale(root):
    modes = [Image.open(root / "images" / rel).mode for _, rel in read_table(root, "images.txt")]
    assert modes.count("L") == round(0.2 * CLASSES * PER_CLASS)
    assert set(modes) == {"L", "RGB"}


def test_small_dataset_still_gets_a_grayscale_image(tmp_path):
    root = make_synthetic_cub(tmp_path, classes=2, per_class=10, image_size=16)
    assert image_shape(16) == (16, 16)
    modes = [Image.open(root / "images" / rel).mode for _, rel in read_table(root, "images.txt")]
    assert modes.count("L") == 1


def test_classes_are_distinct_structures():
    specs = [class_spec(k) for k in range(MAX_CLASSES)]
    assert MAX_CLASSES >= 200 and len(set(specs)) == MAX_CLASSES
    assert len({class_name(k) for k in range(MAX_CLASSES)}) == MAX_CLASSES
    # neighbouring classes (what a small dataset uses) differ in shape and texture
    for k in range(39):
        assert specs[k][0] != specs[k + 1][0] and specs[k][2] != specs[k + 1][2]


def crops(root):
    """Object crops (from the bounding boxes) as 12x12 RGB vectors, and their labels."""
    labels = dict(read_table(root, "image_class_labels.txt"))
    boxes = {row[0]: list(map(float, row[1:])) for row in read_table(root, "bounding_boxes.txt")}
    x, y = [], []
    for image_id, rel in read_table(root, "images.txt"):
        bx, by, bw, bh = boxes[image_id]
        with Image.open(root / "images" / rel) as img:
            crop = img.convert("RGB").crop((bx, by, bx + bw, by + bh)).resize((12, 12))
        x.append(np.asarray(crop, np.float32).ravel() / 255)
        y.append(int(labels[image_id]))
    return np.stack(x), np.array(y)


def test_instances_vary_and_classes_differ(root):
    x, y = crops(root)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0  # no two images alike
    same = y[:, None] == y[None]
    off = ~np.eye(len(y), dtype=bool)
    assert d[same & off].mean() < d[~same].mean()
    nearest = y[d.argmin(1)]
    assert (nearest == y).mean() > 2 / CLASSES  # 1-NN on object crops beats chance


def test_whole_image_mean_colour_does_not_identify_the_class(root):
    # backgrounds vary widely, so an image's mean colour is a weak cue
    labels = dict(read_table(root, "image_class_labels.txt"))
    means, y = [], []
    for image_id, rel in read_table(root, "images.txt"):
        with Image.open(root / "images" / rel) as img:
            means.append(np.asarray(img.convert("RGB"), np.float32).mean((0, 1)))
        y.append(int(labels[image_id]))
    means, y = np.stack(means), np.array(y)
    within = np.mean([means[y == k].std(0).mean() for k in range(1, CLASSES + 1)])
    assert within > 15


def test_same_arguments_give_identical_bytes(tmp_path):
    args = dict(classes=3, per_class=4, image_size=24, seed=7)
    md5s = []
    for name, processes in (("a", 0), ("b", 2)):  # drawn in this process, then in two others
        make_synthetic_cub(tmp_path / name, **args, processes=processes)
        md5s.append(pack_archive(tmp_path / name, tmp_path / f"{name}.tgz"))
    assert md5s[0] == md5s[1]
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()
    make_synthetic_cub(tmp_path / "c", **{**args, "seed": 8})
    assert pack_archive(tmp_path / "c", tmp_path / "c.tgz") != md5s[0]


def test_pack_archive_looks_like_the_official_tgz(root, tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    md5 = pack_archive(root.parent, archive)
    assert md5 == md5sum(archive) == hashlib.md5(archive.read_bytes()).hexdigest()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[0] == "CUB_200_2011" and names == sorted(names, key=lambda n: n.split("/"))
        assert all(n == "CUB_200_2011" or n.startswith("CUB_200_2011/") for n in names)
        assert all(m.isreg() or m.isdir() for m in members)
        assert {(m.uid, m.gid, m.uname, m.mtime) for m in members} == {(0, 0, "", 1293840000)}
        tar.extractall(tmp_path / "out", filter="data")
    for name in ("images.txt", "bounding_boxes.txt"):
        assert (tmp_path / "out" / "CUB_200_2011" / name).read_bytes() == (root / name).read_bytes()
    n_files = sum(1 for p in (tmp_path / "out").rglob("*.jpg"))
    assert n_files == CLASSES * PER_CLASS
    assert not list(tmp_path.glob(".*.tmp*"))


def test_regenerating_replaces_a_synthetic_dataset(tmp_path):
    make_synthetic_cub(tmp_path, classes=4, per_class=3, image_size=16)
    root = make_synthetic_cub(tmp_path, classes=2, per_class=3, image_size=16)
    assert len(list((root / "images").rglob("*.jpg"))) == 6  # no stale images left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CUB_200_2011"]


def test_refuses_to_replace_a_real_dataset(tmp_path):
    (tmp_path / "CUB_200_2011" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="not a synthetic dataset"):
        make_synthetic_cub(tmp_path, classes=2, per_class=2, image_size=16)
    assert (tmp_path / "CUB_200_2011" / "images").is_dir()


def test_pack_archive_needs_the_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        pack_archive(tmp_path, tmp_path / "x.tgz")
    assert not (tmp_path / "x.tgz").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(classes=1), "classes"), (dict(classes=MAX_CLASSES + 1), "classes"),
    (dict(per_class=1), "per_class"), (dict(image_size=15), "image_size"),
    (dict(grayscale_fraction=1.5), "grayscale_fraction"),
    (dict(train_fraction=1.0), "train_fraction"), (dict(train_fraction=0), "train_fraction"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_cub(tmp_path, **kwargs)
    assert not (tmp_path / "CUB_200_2011").exists()


def test_image_shape_matches_cub_photos():
    assert image_shape(500) == (500, 375)
    assert image_shape(64) == (64, 48)


def test_digits_are_real_images_in_the_cub_layout(tmp_path):
    from triplet.data.cub import make_splits, read_metadata
    from triplet.data.synthetic import make_digits_cub

    root = make_digits_cub(tmp_path, image_size=16)
    records = read_metadata(root)
    assert len(records) == 1797 and {r.class_name for r in records} == {f"{k:03d}.Digit_{k - 1}" for k in range(1, 11)}
    splits = make_splits(records, "official", 0.1, 0)
    assert all({r.class_id for r in splits[name]} == set(range(1, 11)) for name in ("train", "val", "test"))
    with Image.open(root / "images" / records[0].path) as image:
        assert image.size == (16, 16)


def test_synthetic_width_is_its_own_option_and_workers_0_prepares_in_process(tmp_path):
    from PIL import Image

    from tests.conftest import call_script

    status, output = call_script("prepare_data", "--synthetic", "--data-dir", tmp_path, "--classes", 2,
                                 "--per-class", 4, "--synthetic-size", 40)
    assert status == 0, output
    image = next((tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"))
    assert Image.open(image).size == (40, 30)
    status, output = call_script("prepare_data", "--data-dir", tmp_path, "--resize", 24, "--workers", 0)
    assert status == 0 and "no extra processes" in output, output
    status, output = call_script("prepare_data", "--synthetic", "--image-size", 40)
    assert status == 2 and "unrecognized arguments: --image-size" in output
