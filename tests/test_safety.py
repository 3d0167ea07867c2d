"""Issue 13, "nothing lost, ever": one test (or more) per case a hostile user found.

Run folders (lock, --force, resume identity, stale temporaries), images (16-bit, extensions,
boxes, pixel limits), one-line errors for damaged files, and bounded archive extraction.
"""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, call_script, run_script
from triplet import checkpoint as checkpoint_module
from triplet.checkpoint import load_checkpoint, save_checkpoint
from triplet.data import cub
from triplet.data.prepare import DataOptions, clip_box, prepare, read_manifest
from triplet.deploy.inference import decode_metadata, encode_metadata
from triplet.deploy.preprocess import open_rgb
from triplet.errors import UserError
from triplet.fileio import atomic_path, read_json, write_json
from triplet.model import build_model
from triplet.runs import claim_run_dir, lock_run_dir, read_config

RUN_ARGS = ["--resize", 48, "--weights", "none", "--image-size", 32, "--batch-size", 16, "--workers", 0,
            "--no-progress"]


def train_args(data_dir, out, *extra):
    return ["--data-dir", data_dir, *RUN_ARGS, "--out", out, *extra]


def one_line(output):
    return len(output.strip().splitlines()) == 1 and "Traceback" not in output


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the finished tiny run (2 epochs, lr 0.001) that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


def config_of(run_dir, **changes):
    config = read_json(run_dir / "config.json")
    return {**config, "options": {**config["options"], **changes}}


# 1. A lock on the run folder, held by rank 0 for the whole run, gone with the process.

def test_a_second_lock_in_any_process_names_the_holder(tmp_path):
    handle = lock_run_dir(tmp_path / "run")
    with pytest.raises(UserError, match=rf"in use by another training process \(PID {os.getpid()}\)"):
        lock_run_dir(tmp_path / "run")
    handle.close()
    lock_run_dir(tmp_path / "run").close()  # released: free again


def test_on_windows_the_lock_is_msvcrt_s_and_the_holder_stays_readable(tmp_path, monkeypatch):
    """Windows has no flock: ``msvcrt.locking`` locks one byte far past the PID (a locked byte is
    unreadable to others). A stand-in msvcrt holds (file, offset) per open descriptor, as Windows
    holds a lock until its handle closes; this checks the path, not Windows itself."""
    import types

    from triplet import runs

    held, calls = {}, []

    def locking(fd, mode, nbytes):
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        calls.append((key[1], mode, nbytes))
        holder = held.get(key)
        try:
            still_open = holder is not None and holder != fd and os.fstat(holder).st_ino == key[0]
        except OSError:
            still_open = False
        if still_open:
            raise PermissionError(13, "Permission denied")
        held[key] = fd

    monkeypatch.setattr(runs, "fcntl", None)
    monkeypatch.setattr(runs, "msvcrt", types.SimpleNamespace(locking=locking, LK_NBLCK=2))
    handle = lock_run_dir(tmp_path / "run")
    assert calls == [(runs.WINDOWS_LOCK_OFFSET, 2, 1)]
    assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(UserError, match=rf"in use by another training process \(PID {os.getpid()}\)"):
        lock_run_dir(tmp_path / "run")
    handle.close()
    lock_run_dir(tmp_path / "run").close()  # released: free again


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--out .*notes.txt: cannot use it as a run folder"):
        lock_run_dir(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_two_training_processes_cannot_share_a_run_folder(synthetic_root, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"),
                              *map(str, train_args(synthetic_root, out, "--epochs", 50))],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = run_script("train", *train_args(synthetic_root, out, "--epochs", 50, "--lr", 0.01), check=False)
        assert second.returncode == 2 and one_line(second.stderr)
        assert f"in use by another training process (PID {first.pid})" in second.stderr
        assert read_json(out / "config.json")["options"]["lr"] == 0.001  # the first run's, untouched
    finally:
        first.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        first.communicate(timeout=60)
    again = run_script("train", *train_args(synthetic_root, out, "--epochs", 1, "--resume"))
    assert "in use" not in again.stderr


# 2. --force checks everything first, then moves the old run aside and says so.

def test_force_with_a_typo_keeps_the_old_run(run_copy, tmp_path):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".lock"}
    status, output = call_script("train", *train_args(tmp_path / "typo", run_copy, "--epochs", 1, "--force"))
    assert status == 2 and "data folder not found" in output and one_line(output)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert not list(run_copy.glob("replaced-*"))


def test_force_moves_the_old_run_aside_when_the_new_one_writes(run_copy, synthetic_root):
    old_best = (run_copy / "checkpoint_best.pt").read_bytes()
    result = run_script("train", *train_args(synthetic_root, run_copy, "--epochs", 1, "--lr", 0.01, "--force"))
    aside = list(run_copy.glob("replaced-*"))
    assert len(aside) == 1 and "moved the previous run (config.json, history.csv" in result.stdout
    assert str(aside[0]) in result.stdout
    assert (aside[0] / "checkpoint_best.pt").read_bytes() == old_best
    assert (aside[0] / "metrics.json").exists() and not (run_copy / "metrics.json").exists()
    assert read_json(run_copy / "config.json")["options"]["lr"] == 0.01
    assert load_checkpoint(run_copy / "checkpoint_last.pt")["epoch"] == 0


# 4. Without config.json, resume compares with the checkpoint's own config.

@pytest.mark.parametrize("damage", ["delete", "[]", '{"options": null}', "\xff not json"])
def test_resume_without_a_readable_config_checks_the_checkpoint(run_copy, damage):
    config = config_of(run_copy, lr=0.5)
    if damage == "delete":
        (run_copy / "config.json").unlink()
    else:
        (run_copy / "config.json").write_bytes(damage.encode("latin-1"))
    with pytest.raises(UserError, match=r"different configuration \(--lr 0.001 -> 0.5\)"):
        claim_run_dir(run_copy, config, resume=True)
    same = {**config, "options": {**config["options"], "lr": 0.001}}
    assert claim_run_dir(run_copy, same, resume=True) == run_copy / "checkpoint_last.pt"


def test_resume_with_lr_changed_and_config_deleted_is_refused_end_to_end(run_copy, synthetic_root):
    (run_copy / "config.json").unlink()
    result = run_script("train", *train_args(synthetic_root, run_copy, "--epochs", 3, "--lr", 0.5, "--resume"),
                        check=False)
    assert result.returncode == 2 and "--lr 0.001 -> 0.5" in result.stderr and one_line(result.stderr)
    assert not (run_copy / "config.json").exists()  # not rewritten to say 0.5


def test_a_damaged_config_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"options": null}')
    with pytest.raises(UserError, match="has no 'options' object.*--force to replace it"):
        claim_run_dir(tmp_path, {"options": {"lr": 0.1}}, resume=True)


@pytest.mark.parametrize("scheduler, extended_ok", [("cosine", False), ("none", True)])
def test_more_epochs_on_resume_only_where_no_schedule_depends_on_them(tmp_path, scheduler, extended_ok):
    """A cosine run of 2 epochs extended to 3 gave epoch 2 lr 0.0005 where a 3-epoch run has
    0.00075, while its config claimed --epochs 3."""
    roles = {"epochs": "extendable"}
    options = {"epochs": 2, "scheduler": scheduler, "lr": 0.001}
    (tmp_path / "config.json").write_text(json.dumps({"options": options, "option_roles": roles}))
    longer = {"options": {**options, "epochs": 3}, "option_roles": roles}
    assert claim_run_dir(tmp_path, longer, resume=True) is None  # no epoch trained yet: nothing to contradict
    torch.save({"model": {}, "epoch": 0, "model_args": {}, "config": {"options": options}}, tmp_path / "checkpoint_last.pt")
    if extended_ok:
        assert claim_run_dir(tmp_path, longer, resume=True) == tmp_path / "checkpoint_last.pt"
    else:
        with pytest.raises(UserError, match="--epochs 2 -> 3 under --scheduler cosine.*resume with --epochs 2"):
            claim_run_dir(tmp_path, longer, resume=True)
    same = {"options": options, "option_roles": roles}
    assert claim_run_dir(tmp_path, same, resume=True) == tmp_path / "checkpoint_last.pt"


# 5. Run identity: where the run is (out) is not what it is.

def test_a_moved_folder_with_a_trailing_slash_resumes(run_copy, synthetic_root, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run_copy.rename(moved)
    result = run_script("train", *train_args(synthetic_root, f"{moved}/", "--epochs", 2, "--resume"))
    assert "nothing to do" in result.stdout


def test_data_dir_spelled_differently_is_the_same_data(run_copy):
    options = read_json(run_copy / "config.json")["options"]
    config = config_of(run_copy, out="../somewhere/else/", data_dir=options["data_dir"] + "/./")
    assert claim_run_dir(run_copy, config, resume=True) == run_copy / "checkpoint_last.pt"


# 6. Temporaries of a killed write are removed when the folder is claimed.

def test_stale_temporaries_are_removed_on_claim(run_copy):
    stale = [run_copy / ".checkpoint_last.pt.k2j4_x.tmp.pt", run_copy / ".history.csv.a1b2.tmp.csv"]
    for path in stale:
        path.write_bytes(b"half a file")
    logged = []
    claim_run_dir(run_copy, read_json(run_copy / "config.json"), resume=True, log=logged.append)
    assert not any(path.exists() for path in stale)
    assert "removed 2 temporary file(s)" in logged[0] and ".checkpoint_last.pt.k2j4_x.tmp.pt" in logged[0]
    assert (run_copy / "checkpoint_last.pt").exists()


# 7. 16-bit images scaled, prepared files named by their format.

def _gradient16(path):
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(values).save(path)
    return values


def test_a_16bit_greyscale_png_is_scaled_not_white(tmp_path):
    values = _gradient16(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(open_rgb(tmp_path / "deep.png"))
    expected = np.rint(values / 257.0)  # 65535 -> 255, 257 -> 1
    assert rgb.shape == (48, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 251  # (3071 * 21) / 257 = 250.9


def _replace_image_with(data_dir, index, make):
    """Swap record ``index``'s image for a file written by ``make(path)``, named .png; return its record."""
    root = data_dir / "CUB_200_2011"
    record = cub.read_metadata(root)[index]
    (root / "images" / record.path).unlink()
    new_path = record.path.rsplit(".", 1)[0] + ".png"
    make(root / "images" / new_path)
    lines = (root / "images.txt").read_text().splitlines()
    lines[index] = f"{record.image_id} {new_path}"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    return new_path


def test_prepared_files_are_jpegs_named_jpg(data_copy):
    new_path = _replace_image_with(data_copy, 0, _gradient16)
    out = prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=lambda *a: None)
    paths = [p for split in ("train", "val", "test") for p in read_manifest(out, split)[0]]
    prepared = [p for p in paths if new_path in p]
    assert len(prepared) == 1 and prepared[0].endswith(".png.jpg")
    with Image.open(prepared[0]) as image:
        assert image.format == "JPEG" and 80 < np.asarray(image).mean() < 175  # the gradient, not white
    assert all(Image.open(p).format == "JPEG" and p.endswith(".jpg") for p in paths[:5])


# 8. Bounding boxes: checked when read (file and line), clipped or refused when cropping.

@pytest.mark.parametrize("box, reason", [("0 0 0 20", "positive width"), ("5 5 -10 20", "positive width"),
                                         ("0 0 nan 20", "finite"), ("0 0 10", "expected 5 fields")])
def test_bad_boxes_are_refused_with_file_and_line(data_copy, box, reason):
    boxes = data_copy / "CUB_200_2011" / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    lines[4] = f"5 {box}"
    boxes.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"bounding_boxes.txt:5: malformed line .*{reason}"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_boxes_are_clipped_to_the_image_or_refused():
    assert clip_box((10, 5, 20, 10), (64, 48), "a.jpg") == (10, 5, 30, 15)
    assert clip_box((-10, -20, 50, 100), (64, 48), "a.jpg") == (0, 0, 40, 48)  # partly outside: clipped
    assert clip_box((60.4, 40, 100, 100), (64, 48), "a.jpg") == (60, 40, 64, 48)
    with pytest.raises(UserError, match=r"a.jpg: its bounding box \(70, 0, 10, 10\).*outside the 64x48 image"):
        clip_box((70, 0, 10, 10), (64, 48), "a.jpg")
    with pytest.raises(UserError, match="outside"):
        clip_box((-30, 0, 20, 10), (64, 48), "a.jpg")


def test_crop_bbox_prepare_with_a_box_outside_names_the_image(data_copy):
    boxes = data_copy / "CUB_200_2011" / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    lines[2] = "3 5000 5000 20 20"
    boxes.write_text("\n".join(lines) + "\n")
    record = cub.read_metadata(data_copy / "CUB_200_2011")[2]
    with pytest.raises(UserError, match=f"{record.path}: its bounding box .* lies outside"):
        prepare(DataOptions(data_dir=str(data_copy), resize=40, crop_bbox=True), workers=1, log=lambda *a: None)


# 9. An explicit pixel limit on every decode path; bombs are one line.

def test_a_small_file_with_a_huge_image_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match=r"bomb.png: 10000x10000 pixels \(100 megapixels\) is over the limit of 64"):
        open_rgb(bomb)


def test_the_pixel_limit_covers_pillows_own_guard(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "small.png")  # 3,072 pixels
    for limit in (2_000, 1_000):  # under Pillow's warning (our check), beyond its error (caught)
        with pytest.raises(UserError, match=f"over the limit of {limit:,} pixels;") as error:
            open_rgb(tmp_path / "small.png", max_pixels=limit)
        assert one_line(str(error.value))
    assert Image.MAX_IMAGE_PIXELS > 1_000_000  # Pillow's global is restored for everyone else
    assert open_rgb(tmp_path / "small.png").size == (64, 48)


def test_prepare_data_applies_max_pixels(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "CUB_200_2011", data / "CUB_200_2011")
    status, output = call_script("prepare_data", "--data-dir", data, "--resize", 40, "--workers", 1,
                                 "--max-pixels", 1000)
    assert status == 2 and "over the limit of 1,000 pixels" in output and "--max-pixels" in output


# 10. Non-UTF-8 bytes in a metadata file: file and line named.

def test_non_utf8_metadata_names_file_and_line(data_copy):
    classes = data_copy / "CUB_200_2011" / "classes.txt"
    lines = classes.read_bytes().splitlines()
    lines[2] = b"3 caf\xe9_bird"
    classes.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=r"classes.txt:3: not UTF-8 text \(byte 0xe9\)"):
        cub.read_metadata(data_copy / "CUB_200_2011")


# 11. Manifests are checked when read; prepare notices and completes an incomplete copy.

@pytest.fixture
def prepared_copy(data_copy):
    return prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=lambda *a: None)


def test_a_manifest_without_a_column_or_with_bad_bytes_is_one_line(prepared_copy):
    manifest = prepared_copy / "train.csv"
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(["path,label"] + [r.split(",")[0] + ",1" for r in rows[1:]]) + "\n")
    with pytest.raises(UserError, match=r"train.csv: has no column class_id \(its header: path,label\)"):
        read_manifest(prepared_copy, "train")
    manifest.write_bytes("\n".join(rows).encode() + b"\nimages/x.jpg,\xff\xfe,x,1\n")
    with pytest.raises(UserError, match=rf"train.csv:{len(rows) + 1}: not UTF-8"):
        read_manifest(prepared_copy, "train")
    manifest.write_text("\n".join(rows[:2] + ["images/x.jpg,seven,x,1"]) + "\n")
    with pytest.raises(UserError, match=r"train.csv:3: class_id 'seven' is not an integer"):
        read_manifest(prepared_copy, "train")


def test_a_missing_prepared_image_is_named_and_prepare_completes_the_copy(prepared_copy, data_copy):
    paths, labels = read_manifest(prepared_copy, "train")
    os.unlink(paths[3])
    with pytest.raises(UserError, match=r"train.csv:5: image .* is missing; the prepared copy is incomplete"):
        read_manifest(prepared_copy, "train")
    logged = []
    prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=logged.append)
    assert "1 prepared image(s) missing" in logged[0]
    assert read_manifest(prepared_copy, "train") == (paths, labels)


# 12. config.json / metrics.json that are JSON but not objects.

@pytest.mark.parametrize("text", ["[]", '{"options": null}', "[1, 2]", '"a string"'])
def test_a_config_that_is_not_an_object_is_one_line(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match="config.json: (holds .* JSON, not a run config|has no 'options' object)"):
        read_config(tmp_path / "config.json")
    status, output = call_script("evaluate", "--run", tmp_path, "--checkpoint", "none")
    assert status == 2 and "config.json" in output and one_line(output)


def test_report_skips_metrics_and_configs_that_are_not_objects(tiny_run, tmp_path):
    results = tmp_path / "results"
    for name, metrics, config in [("good", None, None), ("list", "[1, 2]", None),
                                  ("null-options", None, '{"options": null}'), ("text-p1", '{"precision_at_1": "x"}', None)]:
        shutil.copytree(tiny_run, results / name, ignore=shutil.ignore_patterns("*.pt", "*.npz"))
        if metrics:
            (results / name / "metrics.json").write_text(metrics)
        if config:
            (results / name / "config.json").write_text(config)
    result = run_script("report", "--results", results)
    assert result.stdout.count("warning: skipping") == 3
    report = (results / "REPORT.md").read_text()
    assert "[good]" in report and "[list]" not in report and "[text-p1]" not in report


# 13. A checkpoint that loads but lacks its config, or the keys a resume needs.

def test_a_checkpoint_without_config_is_one_line(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "checkpoint_best.pt", weights_only=True)
    del checkpoint["config"]
    torch.save(checkpoint, tmp_path / "no_config.pt")
    status, output = call_script("evaluate", "--run", tmp_path, "--checkpoint", tmp_path / "no_config.pt")
    assert status == 2 and "holds no training config" in output and one_line(output)


def test_resuming_a_checkpoint_without_optimizer_state_is_one_line(run_copy, synthetic_root):
    checkpoint = torch.load(run_copy / "checkpoint_last.pt", weights_only=True)
    checkpoint["epoch"] = 0
    del checkpoint["optimizer"]
    torch.save(checkpoint, run_copy / "checkpoint_last.pt")
    status, output = call_script("train", *train_args(synthetic_root, run_copy, "--epochs", 2, "--resume"))
    assert status == 2 and "not a triplet checkpoint (needs the keys" in output and "optimizer" in output


# 14. ONNX metadata that is not what the exporter writes.

@pytest.mark.parametrize("key, value, problem", [
    ("embedding_dim", "abc", "embedding_dim 'abc' is not a positive integer"),
    ("image_size", 0, "image_size 0 is not a positive integer"),
    ("resize_size", 1.5, "resize_size 1.5 is not a positive integer"),
    ("mean", [0.5, 0.5], r"mean \[0.5, 0.5\] is not a list of three numbers"),
    ("std", [0.2, 0, 0.2], r"std \[0.2, 0, 0.2\] has a value <= 0"),
    ("backbone", 18, "backbone 18 is not a name"),
])
def test_onnx_metadata_of_the_wrong_type_is_one_line(key, value, problem):
    good = {"backbone": "resnet18", "embedding_dim": 128, "image_size": 224, "resize_size": 256,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert decode_metadata(encode_metadata(good), "m.onnx")["embedding_dim"] == 128
    with pytest.raises(UserError, match=rf"m.onnx: damaged triplet metadata \({problem}\)"):
        decode_metadata(encode_metadata({**good, key: value}), "m.onnx")


# 15. A full disk while saving: said so, file named, previous checkpoint intact.

@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def full_disk(obj, target):
        with open(target, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"checkpoint_last.pt: disk full while writing it.*previous version .* intact"):
        save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]


def test_disk_full_on_any_atomic_write(tmp_path):
    with pytest.raises(UserError, match="history.csv: disk full"):
        with atomic_path(tmp_path / "history.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
    write_json(tmp_path / "ok.json", {})  # other errors are not disk full
    with pytest.raises(OSError, match="Permission"), atomic_path(tmp_path / "x.json"):
        raise OSError(errno.EACCES, "Permission denied")


def test_a_full_disk_stops_prepare_even_with_skip_bad(data_copy, monkeypatch):
    """Disk full was reported as a bad image: "...; or pass --skip-bad", which would then skip
    every image written after it."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(UserError, match="disk full while writing it") as error:
        prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=0, log=lambda *a: None, skip_bad=True)
    assert "--skip-bad" not in str(error.value)


# 16. An unsafe --weights pickle: refused in one line, never advising weights_only=False.

def test_unsafe_weights_are_refused_in_one_line(tmp_path, synthetic_root):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"conv1.weight": torch.zeros(1), "note": Namespace(evil=True)}, unsafe)
    with pytest.raises(UserError) as error:
        build_model("resnet18", 8, str(unsafe))
    message = str(error.value)
    assert message.startswith(f"--weights {unsafe}: refused") and one_line(message)
    assert "weights_only" not in message and "state_dict" in message and "(argparse.Namespace)" in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"not a readable checkpoint \(UnpicklingError: Unsupported operand") as error:
        build_model("resnet18", 8, str(garbage))
    assert one_line(str(error.value)) and "weights_only" not in str(error.value)
    status, output = call_script("train", *train_args(synthetic_root, tmp_path / "run", "--weights", unsafe))
    assert status == 2 and one_line(output) and "weights_only" not in output
    assert not (tmp_path / "run" / "config.json").exists()


# 17. Archive extraction bounded in members and size, refused before writing.

def _archive(path, members, size=3):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"CUB_200_2011/f{i}.txt")
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))


def test_archive_member_count_and_size_are_bounded(tmp_path):
    _archive(tmp_path / "many.tgz", 30)
    with pytest.raises(UserError, match=r"more than 10 members .*Raise --max-members"):
        cub.safe_extract(tmp_path / "many.tgz", tmp_path / "data", max_members=10)
    _archive(tmp_path / "big.tgz", 2, size=600)
    with pytest.raises(UserError, match=r"unpacks to more than 1e-06 GB .*Raise --max-extract-gb"):
        cub.safe_extract(tmp_path / "big.tgz", tmp_path / "data", max_bytes=1000)
    assert list((tmp_path / "data").iterdir()) == []  # nothing written
    assert cub.safe_extract(tmp_path / "big.tgz", tmp_path / "data", max_bytes=1200).is_dir()


def test_prepare_data_options_raise_the_archive_bounds(synthetic_root, tmp_path):
    from triplet.data.layout import pack_archive

    archive = tmp_path / "CUB_200_2011.tgz"
    md5 = pack_archive(synthetic_root, archive)
    args = ["--data-dir", tmp_path / "data", "--archive", archive, "--md5", md5, "--resize", 40, "--workers", 1]
    status, output = call_script("prepare_data", *args, "--max-members", 20)
    assert status == 2 and "more than 20 members" in output.splitlines()[-1] and "Traceback" not in output
    assert not (tmp_path / "data" / "CUB_200_2011").exists() and archive.exists()


def test_a_full_disk_during_training_says_to_resume_not_to_run_it_again(tmp_path, monkeypatch):
    """"free some space and run the command again": the same command was then refused, since the
    folder now holds a run ("already holds a run; pass --resume")."""
    import importlib.util

    from tests.conftest import ROOT
    from triplet.fileio import DiskFull, disk_full_error

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    opts = train.Options(out=str(tmp_path / "run"), epochs=3)

    def full(opts):
        raise disk_full_error(tmp_path / "run" / "checkpoint_last.pt")

    monkeypatch.setattr(train, "main", full)
    with pytest.raises(DiskFull, match="free some space and run the command again"):
        train.interrupted_main(opts)  # nothing written yet: the same command is right
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(DiskFull, match=r"free some space and resume with: python scripts/train.py --epochs 3 "
                                       r"--out .*run --resume"):
        train.interrupted_main(opts)
