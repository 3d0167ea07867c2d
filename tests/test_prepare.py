"""The prepared copy follows its sources: what changes in a photo folder or CSV reaches it, no two
photos share a prepared file, and a run never resumes or is evaluated across a change of splits."""
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import call_script
from tests.test_own_images import quiet, write_manifest
from triplet.data import sources
from triplet.data.prepare import DataOptions, prepare, read_manifest
from triplet.data.provenance import check_same_splits, training_digests
from triplet.deploy.preprocess import preprocess
from triplet.errors import UserError
from triplet.fileio import read_json


def prepare_photos(folder, data_dir, log=quiet, **options):
    options = {"resize": 32, "val_fraction": 0.1, **options}
    return prepare(DataOptions(data_dir=str(data_dir), **options), workers=0, log=log,
                   dataset=sources.from_image_folder(folder, log=quiet), test_fraction=0.2)


def make_classes(root, **per_class):
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = tuple(int(v) for v in np.random.default_rng([len(name), i]).integers(0, 256, 3))
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i}.jpg")
    return root


def test_validation_of_one_class_goes_back_to_training(tmp_path):
    """cats:4 dogs:12: validation was carved from the dogs alone, and train.py's epoch-0 validation
    then failed drawing a negative ("ValueError: high <= 0", exit 1)."""
    notes = []
    prepared = prepare_photos(make_classes(tmp_path / "two", cats=4, dogs=12), tmp_path / "data", log=notes.append)
    assert read_manifest(prepared, "val") == ([], [])
    assert len(read_manifest(prepared, "train")[0]) == 12 and any("validation would hold" in n for n in notes)
    status, output = call_script("train", "--data-dir", tmp_path / "data", "--resize", 32, "--weights", "none",
                                 "--image-size", 32, "--epochs", 1, "--batch-size", 8, "--mining", "hard",
                                 "--samples-per-class", 4, "--workers", 0, "--no-progress", "--out", tmp_path / "run")
    assert status == 0, output
    # the two training cats fill a PK group of 4 by repeating themselves: said, not silent
    assert "note: 1 class of 2 has fewer training images than --samples-per-class 4" in output


def test_a_test_split_of_one_class_is_refused_before_training(tmp_path):
    """--split classes on three classes held out one class: evaluate.py then failed (exit 1)."""
    with pytest.raises(UserError, match="--split classes: needs at least 4 classes"):
        prepare_photos(make_classes(tmp_path / "three", a=8, b=8, c=8), tmp_path / "d3", split="classes")
    prepared = prepare_photos(make_classes(tmp_path / "four", a=8, b=8, c=8, d=8), tmp_path / "d4", split="classes",
                              val_fraction=0)
    assert len(set(read_manifest(prepared, "test")[1])) == 2


def test_two_photos_never_share_a_prepared_file(tmp_path):
    """red.png and a real red.png.jpg were both written to images/a/red.png.jpg: one photo lost, and
    the same image in two splits."""
    folder = make_classes(tmp_path / "photos", a=4, b=4)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a" / "red.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(folder / "a" / "red.png.jpg")
    prepared = prepare_photos(folder, tmp_path / "data", val_fraction=0)
    paths = [p for split in ("train", "test") for p in read_manifest(prepared, split)[0]]
    reds = sorted(p for p in paths if "/red.png" in p)
    assert len(paths) == len(set(paths)) == 10 and len(reds) == 2
    colours = {tuple(np.asarray(Image.open(p))[5, 5] // 128) for p in reds}
    assert colours == {(1, 0, 0), (0, 0, 1)}


def test_a_relabelled_or_edited_photo_reaches_the_prepared_copy(tmp_path):
    """Only the count of images was compared: a fixed label, or a photo replaced by an edited one,
    left the old copy in place ("already prepared with these options; nothing to do")."""
    make_classes(tmp_path / "photos", a=6, b=6, c=6)
    rows = [(f"photos/{c}/{i}.jpg", c) for c in "abc" for i in range(6)]
    csv_path = write_manifest(tmp_path / "set.csv", rows, header=("path", "label"))
    options = DataOptions(data_dir=str(tmp_path / "data"), resize=32, val_fraction=0)

    def prepared_from_csv():
        return prepare(options, workers=0, log=quiet, dataset=sources.from_manifest(csv_path), test_fraction=0.34)

    prepared = prepared_from_csv()
    rows[0] = ("photos/a/0.jpg", "b")
    write_manifest(csv_path, rows, header=("path", "label"))
    prepared_from_csv()
    labels = {p.split("images/")[1]: label for split in ("train", "test")
              for p, label in zip(*read_manifest(prepared, split))}
    assert labels["photos/a/0.jpg"] == labels["photos/b/0.jpg"]
    photo = tmp_path / "photos" / "c" / "1.jpg"
    Image.new("RGB", (40, 30), (250, 250, 250)).save(photo)
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    prepared_from_csv()
    assert np.asarray(Image.open(prepared / "images" / "photos" / "c" / "1.jpg")).min() > 200


def test_thin_strips_are_refused_before_their_resize_makes_them_huge(tmp_path):
    """3,000 x 1 passes the pixel limit, then becomes 768,000 x 256: 855 MB, and a traceback even
    with --skip-bad. The search path's preprocessing refuses it too."""
    folder = make_classes(tmp_path / "photos", a=5, b=5)
    Image.new("RGB", (3000, 1)).save(folder / "a" / "strip.png")
    with pytest.raises(UserError, match=r"strip\.png: 3000x1 pixels is too long and thin: at short side 32 it "
                                        r"would be 96000x32"):
        prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=32), workers=0, log=quiet,
                dataset=sources.from_image_folder(folder, log=quiet), max_pixels=1_000_000)
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=32), workers=0, log=quiet,
                       dataset=sources.from_image_folder(folder, log=quiet), max_pixels=1_000_000, skip_bad=True)
    assert read_json(prepared / "prepare.json")["skipped"][0]["file"].endswith("strip.png")
    with pytest.raises(UserError, match="too long and thin"):
        preprocess(Image.new("RGB", (300_000, 1)), 224)


def test_a_run_is_not_resumed_or_evaluated_across_a_change_of_splits(tmp_path):
    """Adding photos re-draws the split: a training image of the run became a test image, and
    --resume ("nothing to do") and evaluate.py scored the old model on it without a word."""
    folder = make_classes(tmp_path / "photos", cats=20, dogs=8)
    data = ["--data-dir", tmp_path / "data", "--resize", 32]
    train = ["train", *data, "--weights", "none", "--image-size", 32, "--epochs", 1, "--batch-size", 4,
             "--workers", 0, "--no-progress", "--out", tmp_path / "run"]
    assert call_script("prepare_data", "--image-folder", folder, *data, "--workers", 0)[0] == 0
    status, output = call_script(*train)
    assert status == 0, output
    make_classes(folder, dogs=12)
    status, output = call_script("prepare_data", "--image-folder", folder, *data, "--workers", 0)
    assert status == 0 and "changed split since the last preparation" in output
    for command in (train + ["--resume"], ["evaluate", "--run", tmp_path / "run", "--workers", 0]):
        status, output = call_script(*command)
        assert status == 2 and "split is not the one" in output and "train it again" in output, output
    prepared = tmp_path / "data" / "prepared" / "official-r32-val0.1-seed0"
    check_same_splits({"splits": training_digests(prepared)}, prepared, "run", "resuming it")
    check_same_splits({}, prepared, "run", "resuming it")  # a run of before the record: not checked


def test_test_rows_added_alone_leave_the_run_valid(tmp_path):
    """New test rows cannot hold an image the run trained on: evaluation goes on (only train and
    val are compared), where a digest of every split refused it."""
    make_classes(tmp_path / "photos", a=8, b=8, c=8)
    rows = [(f"photos/{c}/{i}.jpg", c, "test" if i >= 5 else "train") for c in "abc" for i in range(7)]
    csv_path = write_manifest(tmp_path / "set.csv", rows)
    data = ["--data-dir", tmp_path / "data", "--resize", 32, "--val-fraction", 0]
    assert call_script("prepare_data", "--manifest", csv_path, *data, "--workers", 0)[0] == 0
    prepared = tmp_path / "data" / "prepared" / "official-r32-val0-seed0"
    recorded = {"splits": training_digests(prepared)}
    write_manifest(csv_path, rows + [(f"photos/{c}/7.jpg", c, "test") for c in "abc"])
    assert call_script("prepare_data", "--manifest", csv_path, *data, "--workers", 0)[0] == 0
    assert len(read_manifest(prepared, "test")[0]) == 9
    check_same_splits(recorded, prepared, "run", "evaluating it")
    write_manifest(csv_path, rows[1:])  # a training row gone: the run's data is not this copy's
    assert call_script("prepare_data", "--manifest", csv_path, *data, "--workers", 0)[0] == 0
    with pytest.raises(UserError, match="its train split is not the one run trained on"):
        check_same_splits(recorded, prepared, "run", "evaluating it")


def test_a_copy_prepared_by_an_earlier_version_is_recorded_not_redone(tmp_path):
    """Copies of before the fingerprint have no sources.csv: their images are kept, their sources
    recorded once, and the run after that has nothing to do."""
    from triplet.fileio import write_json

    folder = make_classes(tmp_path / "photos", a=5, b=5)
    prepared = prepare_photos(folder, tmp_path / "data")
    info = read_json(prepared / "prepare.json")
    del info["dataset"]["fingerprint"]
    write_json(prepared / "prepare.json", info)
    (prepared / "sources.csv").unlink()
    images = {p: p.stat().st_mtime_ns for p in (prepared / "images").rglob("*.jpg")}
    notes = []
    prepare_photos(folder, tmp_path / "data", log=notes.append)
    assert any("prepared by an earlier version" in n for n in notes) and not any("changed since" in n for n in notes)
    assert {p: p.stat().st_mtime_ns for p in (prepared / "images").rglob("*.jpg")} == images
    notes.clear()
    prepare_photos(folder, tmp_path / "data", log=notes.append)
    assert notes == [f"{prepared}: already prepared with these options; nothing to do"]


def test_the_same_folder_spelled_another_way_is_not_prepared_again(tmp_path, monkeypatch):
    """The stamps held the path as typed: --data-dir d, then $PWD/d, re-decoded every image."""
    folder = make_classes(tmp_path / "photos", a=5, b=5)
    prepared = prepare_photos(folder, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    notes = []
    prepare(DataOptions(data_dir="data", resize=32), workers=0, log=notes.append,
            dataset=sources.from_image_folder("photos", log=quiet), test_fraction=0.2)
    assert notes == [f"{prepared.relative_to(tmp_path)}: already prepared with these options; nothing to do"]


def test_an_edited_crop_box_is_cropped_again(tmp_path):
    """--crop-bbox: the fingerprint saw the new box, but the stamps did not, so the old crop stayed."""
    from triplet.data.synthetic import make_synthetic_cub

    make_synthetic_cub(tmp_path, classes=2, per_class=4, image_size=64, processes=0)
    options = DataOptions(data_dir=str(tmp_path), resize=32, crop_bbox=True)
    prepared = prepare(options, workers=0, log=quiet)
    boxes = tmp_path / "CUB_200_2011" / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join(["1 0.0 0.0 8.0 16.0", *lines[1:]]) + "\n")
    prepare(options, workers=0, log=quiet)
    first = read_manifest(prepared, "train")[0] + read_manifest(prepared, "test")[0]
    first = next(p for p in first if p.endswith("_1.jpg"))
    assert Image.open(first).size == (32, 64)


def test_an_earlier_versions_collided_file_is_decoded_again(tmp_path):
    """An earlier version wrote a.png and a real a.png.jpg to the same file; on its copy (no
    sources.csv) the file at that name is redone, so the real a.png.jpg is what it holds."""
    from triplet.fileio import write_json

    folder = make_classes(tmp_path / "photos", a=4, b=4)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(folder / "a" / "x.png")
    Image.new("RGB", (40, 30), (0, 0, 0)).save(folder / "a" / "x.png.jpg")
    prepared = prepare_photos(folder, tmp_path / "data", val_fraction=0)
    renamed = next((prepared / "images" / "a").glob("x.png.jpg.*.jpg"))
    os.replace(renamed, prepared / "images" / "a" / "x.png.jpg")  # the old layout: the PNG's pixels, one file
    (prepared / "sources.csv").unlink()
    info = read_json(prepared / "prepare.json")
    del info["dataset"]["fingerprint"]
    write_json(prepared / "prepare.json", info)
    prepare_photos(folder, tmp_path / "data", val_fraction=0)
    assert np.asarray(Image.open(prepared / "images" / "a" / "x.png.jpg")).max() < 50
    assert np.asarray(Image.open(renamed)).min() > 200
