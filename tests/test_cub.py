"""The CUB pipeline: archive, safe extraction, metadata validation, splits, prepared copy."""
import io
import tarfile

import pytest

from tests.conftest import run_script
from triplet.data import cub
from triplet.data.layout import pack_archive
from triplet.errors import UserError
from triplet.data.prepare import DataOptions, prepare, prepared_dir, read_manifest


def test_metadata_of_the_synthetic_set_is_consistent(synthetic_root):
    records = cub.read_metadata(synthetic_root / "CUB_200_2011")
    assert len(records) == 12 * 12
    assert [r.image_id for r in records] == list(range(1, 145))
    assert {r.class_id for r in records} == set(range(1, 13))
    assert all((synthetic_root / "CUB_200_2011" / "images" / r.path).is_file() for r in records)


def test_official_split_follows_train_test_split_and_carves_validation_per_class(synthetic_root):
    records = cub.read_metadata(synthetic_root / "CUB_200_2011")
    splits = cub.make_splits(records, "official", val_fraction=0.1, seed=0)
    train_flags = {r.image_id for r in records if r.is_train}
    assert {r.image_id for r in splits["train"] + splits["val"]} == train_flags
    assert {r.image_id for r in splits["test"]} == {r.image_id for r in records} - train_flags
    assert not {r.image_id for r in splits["train"]} & {r.image_id for r in splits["val"]}
    for c in range(1, 13):  # stratified: every class gives two validation images (ceil(6*0.1) -> 2)
        assert sum(r.class_id == c for r in splits["val"]) == 2
    assert splits == cub.make_splits(records, "official", 0.1, 0)  # deterministic


def test_classes_split_holds_out_the_second_half_of_the_classes(synthetic_root):
    records = cub.read_metadata(synthetic_root / "CUB_200_2011")
    splits = cub.make_splits(records, "classes", val_fraction=0.1, seed=0)
    assert {r.class_id for r in splits["test"]} == set(range(7, 13))
    assert len(splits["test"]) == 6 * 12
    val_classes = {r.class_id for r in splits["val"]}
    assert len(val_classes) == 2 and val_classes < set(range(1, 7))
    assert {r.class_id for r in splits["train"]} == set(range(1, 7)) - val_classes
    assert len(splits["train"]) + len(splits["val"]) == 6 * 12


def test_prepare_writes_rgb_images_and_manifests_and_is_idempotent(synthetic_root, capsys):
    out = prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=48))
    paths, labels = read_manifest(out, "test")
    assert len(paths) == len(labels) > 0
    from PIL import Image
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) == 48
    header = (out / "train.csv").read_text().splitlines()[0]
    assert header == "path,class_id,class_name,image_id"
    before = (out / "train.csv").stat().st_mtime_ns
    prepare(DataOptions(data_dir=str(synthetic_root), resize=48), log=print)
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.csv").stat().st_mtime_ns == before


def test_other_options_write_a_separate_prepared_folder(data_copy):
    a = prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=lambda *x: None)
    b = prepare(DataOptions(data_dir=str(data_copy), resize=40, crop_bbox=True, split="classes"),
                workers=1, log=lambda *x: None)
    assert a != b and (a / "prepare.json").exists() and (b / "prepare.json").exists()


def test_archive_path_end_to_end(synthetic_root, tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    md5 = pack_archive(synthetic_root, archive)
    data_dir = tmp_path / "data"
    result = run_script("prepare_data", "--data-dir", data_dir, "--archive", archive, "--md5", md5,
                        "--resize", 40, "--workers", 1)
    assert "extracting" in result.stdout
    paths, _ = read_manifest(prepared_dir(DataOptions(data_dir=str(data_dir), resize=40)), "train")
    assert paths and archive.exists()


def test_wrong_md5_is_refused_and_the_users_archive_kept(synthetic_root, tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    pack_archive(synthetic_root, archive)
    before = archive.read_bytes()
    result = run_script("prepare_data", "--data-dir", tmp_path / "data", "--archive", archive, check=False)
    assert result.returncode == 2
    assert "does not match" in result.stderr and "left untouched" in result.stderr
    assert "deleted" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert archive.read_bytes() == before and not (tmp_path / "data" / "CUB_200_2011").exists()


def _evil_archive(path, member_name, kind=tarfile.REGTYPE):
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("CUB_200_2011/images.txt")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"1 a"))
        evil = tarfile.TarInfo(member_name)
        evil.type = kind
        if kind == tarfile.SYMTYPE:
            evil.linkname = "/etc/passwd"
        else:
            evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member, kind", [
    ("../escaped.txt", tarfile.REGTYPE),
    ("CUB_200_2011/../../escaped.txt", tarfile.REGTYPE),
    ("/tmp/triplet-absolute-escape.txt", tarfile.REGTYPE),
    ("CUB_200_2011/link", tarfile.SYMTYPE),
])
def test_unsafe_archive_members_are_refused_and_nothing_is_written(tmp_path, member, kind):
    archive = tmp_path / "evil.tgz"
    _evil_archive(archive, member, kind)
    data_dir = tmp_path / "sandbox" / "data"
    with pytest.raises(UserError, match="refusing to extract") as error:
        cub.safe_extract(archive, data_dir)
    assert member in str(error.value)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "sandbox" / "escaped.txt").exists()
    assert list(data_dir.iterdir()) == []  # not even the good member


def test_truncated_or_non_gzip_archive_is_a_clear_error(synthetic_root, tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    pack_archive(synthetic_root, archive)
    archive.write_bytes(archive.read_bytes()[:4000])
    with pytest.raises(UserError, match="not a readable gzip tar"):
        cub.safe_extract(archive, tmp_path / "data")
    assert not (tmp_path / "data" / "CUB_200_2011").exists()
    archive.write_text("hello, not an archive")
    with pytest.raises(UserError, match="not a readable gzip tar"):
        cub.safe_extract(archive, tmp_path / "data")


def test_missing_metadata_file_is_named(data_copy):
    (data_copy / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(UserError, match=r"bounding_boxes.txt: metadata file missing"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_missing_image_is_named(data_copy):
    records = cub.read_metadata(data_copy / "CUB_200_2011")
    (data_copy / "CUB_200_2011" / "images" / records[5].path).unlink()
    with pytest.raises(UserError, match=f"{records[5].path}: image listed in images.txt \\(id 6\\) is missing"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_mismatched_ids_name_the_file(data_copy):
    labels = data_copy / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match=r"image_class_labels.txt: image ids do not match images.txt \(first difference: "
                                        r"id 144, missing from image_class_labels.txt\); .* extract the archive again"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_a_truncated_images_txt_is_named_as_the_one_that_lacks_ids(data_copy):
    """It used to read as if image_class_labels.txt were the damaged file."""
    images = data_copy / "CUB_200_2011" / "images.txt"
    images.write_text("\n".join(images.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match=r"first difference: id 144, missing from images.txt\)"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_malformed_line_names_file_and_line(data_copy):
    split = data_copy / "CUB_200_2011" / "train_test_split.txt"
    lines = split.read_text().splitlines()
    lines[2] = "3 yes"
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train_test_split.txt:3: malformed line"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_image_paths_cannot_escape_the_dataset_folder(data_copy):
    images = data_copy / "CUB_200_2011" / "images.txt"
    lines = images.read_text().splitlines()
    lines[0] = "1 ../../etc/passwd"
    images.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="escapes the dataset folder"):
        cub.read_metadata(data_copy / "CUB_200_2011")


def test_missing_data_folder_suggests_make_data(tmp_path):
    result = run_script("prepare_data", "--data-dir", tmp_path / "nothing", "--no-download", check=False)
    assert result.returncode == 2 and "make data" in result.stderr


def test_unreadable_image_is_found_during_prepare(data_copy):
    records = cub.read_metadata(data_copy / "CUB_200_2011")
    bad = data_copy / "CUB_200_2011" / "images" / records[3].path
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(UserError, match=f"{records[3].path}: not a readable image"):
        prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=lambda *a: None)


def test_offline_download_says_how_to_get_the_archive_by_hand(tmp_path):
    with pytest.raises(UserError, match="--archive"):
        cub.download(tmp_path / "CUB_200_2011.tgz", urls=["http://127.0.0.1:9/CUB_200_2011.tgz"])


class _RangeHandler:
    """A loopback HTTP server that serves one file with Range support, optionally cut short once."""

    def __init__(self, payload, cut_first_at=None):
        import http.server
        import threading

        outer = self
        self.payload, self.cut, self.requests = payload, cut_first_at, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                outer.requests.append(start)
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:  # the first transfer dies half-way
                    body, outer.cut = body[:outer.cut], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/CUB_200_2011.tgz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_download_resumes_a_partial_file_and_verifies_md5(synthetic_root, tmp_path):
    archive = tmp_path / "source.tgz"
    md5 = pack_archive(synthetic_root, archive)
    payload = archive.read_bytes()
    server = _RangeHandler(payload, cut_first_at=len(payload) // 3)
    try:
        dest = tmp_path / "data" / "CUB_200_2011.tgz"
        # First mirror: the transfer breaks; the second call resumes from the partial file.
        with pytest.raises(UserError, match="--archive"):
            cub.download(dest, urls=[server.url], md5=md5, expected_bytes=len(payload))
        partial = dest.with_name(dest.name + ".part")
        assert 0 < partial.stat().st_size < len(payload)
        cub.download(dest, urls=["http://127.0.0.1:9/unreachable.tgz", server.url], md5=md5,
                     expected_bytes=len(payload))
        assert server.requests[-1] == len(payload) // 3  # asked only for the rest (HTTP Range)
        assert dest.read_bytes() == payload and not partial.exists()
    finally:
        server.close()


def test_download_with_a_wrong_md5_deletes_the_file(synthetic_root, tmp_path):
    archive = tmp_path / "source.tgz"
    pack_archive(synthetic_root, archive)
    server = _RangeHandler(archive.read_bytes())
    try:
        dest = tmp_path / "data" / "CUB_200_2011.tgz"
        with pytest.raises(UserError, match="does not match"):
            cub.download(dest, urls=[server.url], md5="0" * 32)
        assert not dest.exists()
    finally:
        server.close()


def test_an_empty_test_split_is_refused(data_copy):
    split = data_copy / "CUB_200_2011" / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 1\n" for line in split.read_text().splitlines()))
    with pytest.raises(UserError, match="the test split of --split official is empty"):
        prepare(DataOptions(data_dir=str(data_copy), resize=40), workers=1, log=lambda *a: None)


def test_a_missing_prepared_copy_names_the_options_and_the_copies_that_exist(synthetic_root):
    from triplet.data.prepare import missing_prepared_message

    wanted = prepared_dir(DataOptions(data_dir=str(synthetic_root), resize=256))
    message = missing_prepared_message(wanted)
    assert "--resize, --val-fraction" in message and str(wanted) in message
    assert "official-r48-val0.1-seed0 (--split official --resize 48 --val-fraction 0.1 --split-seed 0)" in message
    with pytest.raises(UserError, match="--resize 48"):
        read_manifest(wanted, "train")


def test_a_data_folder_that_moved_says_to_pass_data_dir(tmp_path):
    """export_onnx.py after `mv data elsewhere` listed the options that must match, never --data-dir."""
    with pytest.raises(UserError, match="data folder not found; if it moved, pass --data-dir"):
        read_manifest(prepared_dir(DataOptions(data_dir=str(tmp_path / "moved"))), "test")
