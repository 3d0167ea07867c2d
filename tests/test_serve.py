"""The web page's JSON API and its bad-input table (in process), and scripts/serve.py as a real server."""
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from tests.conftest import ROOT, call_script, copy_gallery
from triplet.deploy.gallery import load_gallery
from triplet.deploy.inference import OnnxEmbedder
from triplet.deploy.server import create_app, load_browse_set


@pytest.fixture(scope="module")
def served(model_path, test_images, tiny_run, tmp_path_factory):
    """(client, gallery, browse set): the app over 12 test images, browsing the tiny run's test set."""
    folder = copy_gallery(test_images[:12], tmp_path_factory.mktemp("served") / "gallery")
    embedder = OnnxEmbedder(model_path)
    gallery = load_gallery(embedder, folder, use_cache=False, log=lambda m: None)
    browse = load_browse_set(tiny_run)
    app = create_app(embedder, gallery, browse, top_k_default=4, max_upload_bytes=200_000, max_pixels=4_000_000)
    return TestClient(app), gallery, browse


def png_bytes(size=(48, 48), colour=(30, 60, 90), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_info(served):
    client, gallery, browse = served
    assert client.get("/api/health").json() == {"status": "ok", "gallery_size": 12, "index": "exact",
                                                "model": "resnet18"}
    info = client.get("/api/info").json()
    assert info["model"]["backbone"] == "resnet18" and info["model"]["embedding_dim"] == 128
    assert info["model"]["image_size"] == 32 and isinstance(info["model"]["test_precision_at_1"], float)
    assert [g["path"] for g in info["gallery"]] == gallery.rel and info["browse"] is True
    assert "<title>triplet: find similar images</title>" in client.get("/").text


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_search_finds_the_uploaded_gallery_image(served, form):
    client, gallery, _ = served
    data = gallery.files[7].read_bytes()
    if form == "raw":
        response = client.post("/api/search?k=3", content=data, headers={"Content-Type": "image/jpeg"})
    else:
        response = client.post("/api/search?k=3", files={"image": ("q.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["id"] == 7 and results[0]["path"] == gallery.rel[7] and results[0]["score"] > 0.9999
    assert results[0]["class"] == gallery.rel[7].split("/")[0] and results[0]["url"] == "/gallery/7"
    assert client.get(results[1]["url"]).content == gallery.files[results[1]["id"]].read_bytes()


def test_gallery_image_as_query_leaves_itself_out(served):
    client, gallery, _ = served
    body = client.get("/api/gallery/2/neighbours?k=5").json()
    expected = np.argsort(-(gallery.embeddings @ gallery.embeddings[2]), kind="stable")
    assert [r["id"] for r in body["results"]] == [int(i) for i in expected if i != 2][:5]
    assert body["query_class"] == gallery.rel[2].split("/")[0]


def test_browse_marks_right_and_wrong_neighbours(served):
    client, _, browse = served
    items = client.get("/api/browse").json()["items"]
    assert len(items) == len(browse["paths"]) and items[5]["class"] == browse["paths"][5].parent.name
    body = client.get("/api/browse/5?k=6").json()
    assert 5 not in [r["id"] for r in body["results"]] and len(body["results"]) == 6
    assert [r["correct"] for r in body["results"]] == [bool(browse["labels"][r["id"]] == browse["labels"][5])
                                                     for r in body["results"]]
    assert client.get(body["results"][0]["url"]).content == browse["paths"][body["results"][0]["id"]].read_bytes()


def bomb_png():
    """A small file that decodes to 256 megapixels: more than Pillow's own decompression-bomb limit."""
    buffer = io.BytesIO()
    Image.new("1", (16_000, 16_000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "text": (b"this is not an image\n", 400, "not an image"),
    "empty": (b"", 400, "empty"),
    "truncated": (None, 400, "not a readable image"),
    "too_many_bytes": (b"\xff" * 300_000, 413, "larger than"),
    "too_many_pixels": (lambda: png_bytes((2500, 2000), mode="1"), 413, "2500 x 2000 pixels is over the limit"),
    "bomb": (bomb_png, 413, "decompression bomb"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_get_a_clear_status_and_the_server_keeps_answering(served, case):
    client, gallery, _ = served
    data, status, message = BAD_UPLOADS[case]
    if data is None:
        whole = gallery.files[0].read_bytes()
        data = whole[:len(whole) // 2]
    elif callable(data):
        data = data()
    response = client.post("/api/search", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == status and message in response.json()["error"]
    assert "\n" not in response.json()["error"]
    assert client.get("/api/health").status_code == 200
    assert client.post("/api/search?k=1", content=gallery.files[3].read_bytes()).json()["results"][0]["id"] == 3


@pytest.mark.parametrize("url, status", [("/gallery/12", 404), ("/gallery/-1", 404), ("/gallery/..%2F..%2Fetc%2Fpasswd", 404),
                                         ("/gallery/%2Fetc%2Fpasswd", 404), ("/browse/image/99999", 404),
                                         ("/api/gallery/0/neighbours?k=0", 400), ("/api/gallery/0/neighbours?k=abc", 400),
                                         ("/api/search", 405)])
def test_nothing_outside_the_lists_is_served(served, url, status):
    client, _, _ = served
    response = client.get(url)
    assert response.status_code == status and b"root:" not in response.content


@pytest.mark.parametrize("method, url, body, status, message", [
    ("post", "/api/search", b"--x\r\nnot a form", 400, "upload: not a readable multipart form (Invalid multipart"),
    ("post", "/api/search", b"no boundary", 400, "upload: not a readable multipart form (Missing boundary"),
    ("get", "/api/gallery/-1/neighbours", None, 404, "/api/gallery/-1/neighbours: Not Found"),
    ("get", "/api/search", None, 405, "/api/search: Method Not Allowed"),
])
def test_api_errors_from_starlette_are_json_too(served, method, url, body, status, message):
    """Starlette's own answers to a malformed form, an id its route does not match, a wrong method were plain text."""
    client, _, _ = served
    boundary = "; boundary=y" if body and body.startswith(b"--") else ""
    response = client.request(method, url, content=body, headers={"Content-Type": "multipart/form-data" + boundary})
    assert response.status_code == status and response.json()["error"].startswith(message)
    assert client.get("/gallery/-1").text == "Not Found"  # the page's files stay plain


def test_a_file_swapped_for_a_symlink_after_start_is_refused(model_path, test_images, tmp_path):
    folder = copy_gallery(test_images[:3], tmp_path / "gallery")
    gallery = load_gallery(OnnxEmbedder(model_path), folder, use_cache=False, log=lambda m: None)
    client = TestClient(create_app(OnnxEmbedder(model_path), gallery))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    gallery.files[1].unlink()
    gallery.files[1].symlink_to(secret)
    assert client.get("/gallery/1").status_code == 404 and client.get("/gallery/0").status_code == 200
    assert client.get("/api/browse").status_code == 404  # no test set given


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_path, gallery, run_dir, tmp_path):
    """scripts/serve.py in a subprocess on a free loopback port; returns (process, base url) once it answers."""
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(model_path),
                                "--gallery", str(gallery), "--run", str(run_dir), "--port", str(port), "--top-k", "4"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited {process.returncode}:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("serve.py did not answer within 120 s")


@pytest.fixture(scope="module")
def server(model_path, test_images, tiny_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("server")
    gallery = copy_gallery(test_images[:12], tmp_path / "gallery")
    process, url = start_server(model_path, gallery, tiny_run, tmp_path)
    yield url, gallery
    process.terminate()
    process.wait(timeout=30)


def test_real_server_answers_a_curl_style_upload(server):
    url, gallery = server
    query = sorted(gallery.rglob("*.jpg"))[4]
    request = urllib.request.Request(f"{url}/api/search?k=2", data=query.read_bytes(),
                                     headers={"Content-Type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        results = json.load(response)["results"]
    assert results[0]["path"] == query.relative_to(gallery).as_posix() and results[0]["score"] > 0.9999
    bad = urllib.request.Request(f"{url}/api/search", data=b"junk", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(bad, timeout=60)
    assert error.value.code == 400
    with urllib.request.urlopen(f"{url}/api/health", timeout=10) as response:
        assert json.load(response)["status"] == "ok"


def test_busy_port_is_a_one_line_error(model_path, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        status, out = call_script("serve", "--model", model_path, "--gallery", tmp_path, "--port",
                                  busy.getsockname()[1])
    assert status == 2 and "cannot listen there" in out and "choose another --port" in out


@pytest.mark.parametrize("host", ["256.1.1.1", "192.0.2.1"])  # no such address; an address of another machine
def test_a_host_that_cannot_be_bound_names_host_not_port(model_path, tmp_path, host):
    status, out = call_script("serve", "--model", model_path, "--gallery", tmp_path, "--host", host)
    assert status == 2 and f"--host {host}: cannot listen there" in out and "--port" not in out
