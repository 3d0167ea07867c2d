"""Your own images: the class-folder and CSV adapters, both split modes, query/gallery, every
error a user can cause, --skip-bad, and the source folder left untouched."""
import csv

import numpy as np
import pytest

from tests.conftest import call_script
from triplet.data import sources
from triplet.data.prepare import DataOptions, prepare, read_manifest, read_prepare_info
from triplet.data.provenance import training_digests
from triplet.data.synthetic import render
from triplet.errors import UserError
from triplet.fileio import read_json


def make_photo_folder(root, classes=4, per_class=6, size=48, nested=False):
    """``root/<class>/IMG_*.jpg`` like a user's photo folder; one class keeps photos one level deeper."""
    for k in range(classes):
        for i in range(per_class):
            image, _ = render(k, np.random.default_rng([7, k, i]), size)
            folder = root / f"class {k}" / ("2024" if nested and k == 0 and i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"IMG_{i:04d}.jpg", quality=90)
    return root


def snapshot(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def quiet(*args, **kwargs):
    pass


def prepare_folder(folder, data_dir, split="official", test_fraction=0.34, skip_bad=False, **options):
    return prepare(DataOptions(data_dir=str(data_dir), split=split, resize=32, val_fraction=0, **options),
                   workers=1, log=quiet, dataset=sources.from_image_folder(folder, log=quiet),
                   test_fraction=test_fraction, skip_bad=skip_bad)


def classes_of(prepared, split):
    return read_manifest(prepared, split)[1]


def write_manifest(path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_folder_official_split_is_stratified_seeded_and_reads_only(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", nested=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "loose.jpg").write_bytes((folder / "class 1" / "IMG_0000.jpg").read_bytes())
    (folder / ".cache").mkdir()
    before = snapshot(folder)
    prepared = prepare_folder(folder, tmp_path / "data")
    assert snapshot(folder) == before  # the source is only read
    train, test = classes_of(prepared, "train"), classes_of(prepared, "test")
    assert len(train) + len(test) == 24  # the nested photos count, the loose one does not
    assert {c: test.count(c) for c in set(test)} == {1: 2, 2: 2, 3: 2, 4: 2}  # round(6 * 0.34) per class
    info = read_json(prepared / "prepare.json")
    assert info["dataset"] | {"source": "", "fingerprint": ""} == {
        "name": "photos", "kind": "folder", "source": "", "listed": 24, "test_fraction": 0.34, "fingerprint": ""}
    assert read_prepare_info(prepared)["protocol"] == "leave-one-out"
    paths = read_manifest(prepared, "train")[0]
    assert any("/class 0/2024/" in p for p in paths)
    again = prepare_folder(folder, tmp_path / "data2")
    assert [p.split("images/")[1] for p in read_manifest(again, "test")[0]] == \
        [p.split("images/")[1] for p in read_manifest(prepared, "test")[0]]  # seeded: the same split


def test_folder_classes_split_holds_out_whole_classes(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", classes=6)
    prepared = prepare_folder(folder, tmp_path / "data", split="classes", test_fraction=0.34)
    train, test = set(classes_of(prepared, "train")), set(classes_of(prepared, "test"))
    assert len(test) == 2 and len(train) == 4 and not train & test


def test_a_prepared_copy_is_reused_and_refreshed_when_photos_are_added(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    prepared = prepare_folder(folder, tmp_path / "data")
    stamp = (prepared / "prepare.json").stat().st_mtime_ns
    assert prepare_folder(folder, tmp_path / "data") == prepared
    assert (prepared / "prepare.json").stat().st_mtime_ns == stamp
    image, _ = render(0, np.random.default_rng(99), 48)
    image.save(folder / "class 0" / "new.jpg")
    prepare_folder(folder, tmp_path / "data")
    assert read_json(prepared / "prepare.json")["dataset"]["listed"] == 25


def test_another_dataset_never_lands_in_the_same_prepared_folder(tmp_path):
    prepare_folder(make_photo_folder(tmp_path / "a"), tmp_path / "data")
    with pytest.raises(UserError, match="holds a prepared copy of .*a, not .*b; pass another --data-dir"):
        prepare_folder(make_photo_folder(tmp_path / "b"), tmp_path / "data")


def test_unreadable_image_is_named_and_skip_bad_lists_it(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=7)
    bad = folder / "class 2" / "IMG_0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (folder / "class 1" / "fake.png").write_text("<html>not a picture</html>")
    with pytest.raises(UserError, match=r"(IMG_0003\.jpg|fake\.png): not a readable image .*--skip-bad"):
        prepare_folder(folder, tmp_path / "data")
    logged = []
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=32, val_fraction=0), workers=1,
                       log=logged.append, dataset=sources.from_image_folder(folder, log=quiet), skip_bad=True)
    skipped = read_json(prepared / "prepare.json")["skipped"]
    assert sorted(s["file"] for s in skipped) == sorted([str(folder / "class 1" / "fake.png"), str(bad)])
    assert any("skipped 2 unreadable image(s) of 29" in line for line in logged)
    listed = read_manifest(prepared, "train")[0] + read_manifest(prepared, "test")[0]
    assert len(listed) == 27 and not any("fake" in p or "class 2/IMG_0003" in p for p in listed)


def test_a_class_with_a_single_photo_is_named(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    (folder / "lonely").mkdir()
    (folder / "class 0" / "IMG_0000.jpg").rename(folder / "lonely" / "only.jpg")
    with pytest.raises(UserError, match=r"class 'lonely' has 1 train image \(.*lonely/only\.jpg\); triplets need"):
        prepare_folder(folder, tmp_path / "data")


def test_a_folder_of_one_class_is_refused_by_prepare_data_not_by_train(tmp_path):
    """It used to print "prepared ... next: python scripts/train.py", which then refused it."""
    folder = make_photo_folder(tmp_path / "photos", classes=1)
    status, output = call_script("prepare_data", "--image-folder", folder, "--data-dir", tmp_path / "data",
                                 "--resize", 32, "--workers", 1)
    assert status == 2 and "in 1 class(es); triplets need at least two classes" in output
    assert "add photos" in output and "next:" not in output


def test_too_few_photos_for_a_test_split_is_refused(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=2)
    with pytest.raises(UserError, match="the test split of --split official is empty"):
        prepare_folder(folder, tmp_path / "data")
    with pytest.raises(UserError, match="--split classes: needs at least 4 classes"):
        prepare_folder(make_photo_folder(tmp_path / "two", classes=2), tmp_path / "d2", split="classes")


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="--image-folder .*nowhere: folder not found"):
        sources.from_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in class subfolders; expected"):
        sources.from_image_folder(tmp_path / "empty", log=quiet)
    folder = make_photo_folder(tmp_path / "photos")
    with pytest.raises(UserError, match="--crop-bbox: .* has no bounding boxes"):
        prepare_folder(folder, tmp_path / "data", crop_bbox=True)


def test_manifest_with_train_and_test_rows_and_carved_validation(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", per_class=8)
    rows = [(f"photos/class {k}/IMG_{i:04d}.jpg", f"c{k}", "test" if i >= 6 else "train")
            for k in range(4) for i in range(8)]
    csv_path = write_manifest(tmp_path / "set.csv", rows)
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=32, val_fraction=0.25), workers=1,
                       log=quiet, dataset=sources.from_manifest(csv_path))
    counts = read_json(prepared / "prepare.json")["images"]
    assert counts == {"train": 16, "val": 8, "test": 8}  # validation carved from train: 2 per class
    assert read_json(prepared / "prepare.json")["dataset"]["kind"] == "manifest"
    assert folder.exists()


def test_manifest_without_split_column_splits_like_a_folder(tmp_path):
    make_photo_folder(tmp_path / "photos", classes=6)
    rows = [(f"photos/class {k}/IMG_{i:04d}.jpg", f"c{k}") for k in range(6) for i in range(6)]
    csv_path = write_manifest(tmp_path / "set.csv", rows, header=("path", "label"))
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), split="classes", resize=32, val_fraction=0),
                       workers=1, log=quiet, dataset=sources.from_manifest(csv_path), test_fraction=0.5)
    assert len(set(classes_of(prepared, "test"))) == 3


def test_manifest_query_gallery_writes_both_lists_and_the_protocol(tmp_path):
    make_photo_folder(tmp_path / "photos", per_class=8)
    rows = [(f"photos/class {k}/IMG_{i:04d}.jpg", f"c{k}", "query" if i == 6 else "gallery" if i == 7 else
             "train") for k in range(4) for i in range(8)]
    rows = [(p, label, "gallery" if (label, split) == ("c3", "train") and p.endswith("5.jpg") else split)
            for p, label, split in rows]
    prepared = prepare(DataOptions(data_dir=str(tmp_path / "data"), resize=32, val_fraction=0), workers=1, log=quiet,
                       dataset=sources.from_manifest(write_manifest(tmp_path / "qg.csv", rows)))
    info = read_json(prepared / "prepare.json")
    assert info["protocol"] == "query-gallery" == read_prepare_info(prepared)["protocol"]
    assert info["images"] == {"train": 23, "val": 0, "test": 9, "query": 4, "gallery": 5}
    assert set(read_manifest(prepared, "query")[0]) | set(read_manifest(prepared, "gallery")[0]) == \
        set(read_manifest(prepared, "test")[0])


@pytest.mark.parametrize("rows, message", [
    ([("a.jpg", "x", "train")], r"set\.csv:2: .*a\.jpg: image file not found"),
    ([("photos/class 0/IMG_0000.jpg", "", "train")], r"set\.csv:2: needs a path and a label"),
    ([("photos/class 0/IMG_0000.jpg", "x", "train"), ("photos/class 0/IMG_0000.jpg", "x", "test")],
     r"set\.csv:3: .* is listed twice \(first on line 2\)"),
    ([("photos/class 0/IMG_0000.jpg", "x", "validation")], r"set\.csv:2: split 'validation' is not one of train"),
    ([("photos/class 0/IMG_0000.jpg", "x", "query"), ("photos/class 0/IMG_0001.jpg", "x", "test")],
     r"mixes test rows with query/gallery rows"),
    ([("photos/class 0/IMG_0000.jpg", "x", "query")], r"has query rows but no gallery rows"),
])
def test_manifest_errors_name_file_and_line(tmp_path, rows, message):
    make_photo_folder(tmp_path / "photos", classes=1, per_class=2)
    with pytest.raises(UserError, match=message):
        sources.from_manifest(write_manifest(tmp_path / "set.csv", rows))


def test_manifest_header_and_missing_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"--manifest .*none\.csv: file not found"):
        sources.from_manifest(tmp_path / "none.csv")
    with pytest.raises(UserError, match=r"bad\.csv:1: header file,class lacks path and label"):
        sources.from_manifest(write_manifest(tmp_path / "bad.csv", [], header=("file", "class")))
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="binary.csv"):
        sources.from_manifest(tmp_path / "binary.csv")


def test_prepare_data_script_defaults_the_data_dir_and_refuses_writing_into_the_source(tmp_path, monkeypatch):
    folder = make_photo_folder(tmp_path / "my_photos")
    monkeypatch.chdir(tmp_path)
    status, output = call_script("prepare_data", "--image-folder", "my_photos", "--resize", 32, "--workers", 1)
    assert status == 0, output
    assert (tmp_path / "data" / "my_photos" / "prepared" / "official-r32-val0.1-seed0" / "prepare.json").is_file()
    assert "next: python scripts/train.py --data-dir data/my_photos --resize 32" in output
    status, output = call_script("prepare_data", "--image-folder", folder, "--data-dir", folder / "out")
    assert status == 2 and "inside --image-folder" in output
    status, output = call_script("prepare_data", "--image-folder", folder, "--manifest", "x.csv")
    assert status == 2 and "--image-folder and --manifest: pick one" in output


def test_the_whole_chain_from_a_photo_folder(tmp_path, monkeypatch):
    """prepare -> train -> evaluate -> plots -> report -> ONNX (+INT8) -> search, as docs/own-images.md runs it."""
    make_photo_folder(tmp_path / "photos", classes=4, per_class=8)
    monkeypatch.chdir(tmp_path)
    data = ["--data-dir", "data/photos", "--resize", 40]
    steps = [
        ("prepare_data", "--image-folder", "photos", *data, "--workers", 1),
        ("train", *data, "--backbone", "resnet18", "--weights", "none", "--image-size", 32, "--epochs", 1,
         "--batch-size", 8, "--workers", 0, "--no-progress", "--out", "results/photos-resnet18"),
        ("evaluate", "--run", "results/photos-resnet18", "--workers", 0),
        ("plot_embeddings", "--run", "results/photos-resnet18"),
        ("report", "--results", "results"),
        ("export_onnx", "--run", "results/photos-resnet18", "--out", "exports/photos.onnx", "--int8",
         "--calibration-images", 8, "--max-drop", 100),
        ("search", "--model", "exports/photos.onnx", "--gallery", "photos", "--query", "photos/class 1/IMG_0003.jpg",
         "--top-k", 3),
    ]
    outputs = {}
    for name, *args in steps:
        status, outputs[name] = call_script(name, *args)
        assert status == 0, f"{name}: {outputs[name]}"
    run = tmp_path / "results" / "photos-resnet18"
    splits = training_digests(tmp_path / "data" / "photos" / "prepared" / "official-r40-val0.1-seed0")
    assert read_json(run / "config.json")["dataset"] | {"source": ""} == {"name": "photos", "kind": "folder", "source": "",
                                                                         "splits": splits}
    metrics = read_json(run / "metrics.json")
    assert (metrics["dataset"], metrics["dataset_kind"], metrics["protocol"]) == ("photos", "folder", "leave-one-out")
    assert "### photos (folder)" in (tmp_path / "results" / "REPORT.md").read_text()
    assert (tmp_path / "exports" / "photos.int8.onnx").is_file()
    assert "1. 1.0000  class 1/IMG_0003.jpg" in outputs["search"]


def test_a_query_gallery_manifest_is_evaluated_with_its_protocol(tmp_path, monkeypatch):
    make_photo_folder(tmp_path / "photos", classes=4, per_class=8)
    rows = [(f"photos/class {k}/IMG_{i:04d}.jpg", f"c{k}", "query" if i == 0 or (k == 3 and i < 4)
             else "gallery" if i < 4 else "train") for k in range(4) for i in range(8)]
    write_manifest(tmp_path / "shop.csv", rows)  # class 3: queries only, none in the gallery
    monkeypatch.chdir(tmp_path)
    data = ["--data-dir", "data/shop", "--resize", 40, "--val-fraction", 0]
    for name, *args in [("prepare_data", "--manifest", "shop.csv", *data, "--workers", 1),
                        ("train", *data, "--weights", "none", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
                         "--workers", 0, "--no-progress", "--out", "results/shop"),
                        ("evaluate", "--run", "results/shop", "--workers", 0)]:
        status, output = call_script(name, *args)
        assert status == 0, f"{name}: {output}"
    assert "note: 4 of 7 queries have no image of their class in the gallery" in output
    metrics = read_json(tmp_path / "results" / "shop" / "metrics.json")
    assert metrics["protocol"] == "query-gallery" and metrics["dataset_kind"] == "manifest"
    assert (metrics["num_queries"], metrics["num_gallery"], metrics["num_images"]) == (7, 9, 16)


def test_manifest_problems_found_while_preparing_name_the_csv_line(tmp_path):
    make_photo_folder(tmp_path / "photos", classes=2, per_class=6)
    rows = [(f"photos/class {k}/IMG_{i:04d}.jpg", f"c{k}", "test" if i >= 4 else "train")
            for k in range(2) for i in range(6)]
    broken = tmp_path / "photos" / "class 1" / "IMG_0002.jpg"
    broken.write_bytes(b"\xff\xd8\xff truncated")
    options = DataOptions(data_dir=str(tmp_path / "data"), resize=32, val_fraction=0)
    with pytest.raises(UserError, match=r"IMG_0002\.jpg: not a readable image .*\(listed at .*set\.csv:10\)"):
        prepare(options, workers=1, log=quiet, dataset=sources.from_manifest(write_manifest(tmp_path / "set.csv", rows)))
    rows[1:4] = [(path, label, "test") for path, label, _ in rows[1:4]]  # c0 keeps one training image (line 2)
    with pytest.raises(UserError, match=r"class 'c0' has 1 train image \(.*set\.csv:2\)"):
        prepare(options, workers=1, log=quiet, dataset=sources.from_manifest(write_manifest(tmp_path / "set.csv", rows)))


def test_files_of_other_kinds_are_counted_in_a_note(tmp_path):
    """A phone's .heic photos, a .gif and a .DS_Store were left out without a word."""
    folder = make_photo_folder(tmp_path / "photos", classes=2, per_class=3)
    for name in ("IMG_9.HEIC", "IMG_10.heic", "anim.gif", ".DS_Store"):
        (folder / "class 0" / name).write_bytes(b"x")
    notes = []
    dataset = sources.from_image_folder(folder, log=notes.append)
    assert len(dataset.records) == 6
    note, = [n for n in notes if "skipped" in n]
    assert "4 file(s) in class folders skipped" in note and "(.heic 2, .gif 1, hidden 1)" in note


def test_a_manifest_column_named_twice_is_refused_not_read_from_the_last(tmp_path):
    """path,label,label read the second label column without a word."""
    make_photo_folder(tmp_path / "photos", classes=1, per_class=2)
    rows = [("photos/class 0/IMG_0000.jpg", "cat", "dog"), ("photos/class 0/IMG_0001.jpg", "cat", "dog")]
    with pytest.raises(UserError, match=r"set\.csv:1: header path,label,label has the column label twice"):
        sources.from_manifest(write_manifest(tmp_path / "set.csv", rows, header=("path", "label", " label")))
    notes = write_manifest(tmp_path / "notes.csv", [row + ("",) for row in rows], header=("path", "label", "", ""))
    assert [r.class_name for r in sources.from_manifest(notes).records] == ["cat", "cat"]  # blank ones are not read
