"""The local "find similar images" web page and its JSON API (Starlette; torch-free).

``create_app`` wires an ``OnnxEmbedder``, a ``Gallery`` and optionally a run's test set (the
browse view) into routes:

| route | what |
| --- | --- |
| ``GET /`` | the page (``static/index.html``) |
| ``GET /api/health`` | ``{"status": "ok", ...}``: for scripts and load balancers |
| ``GET /api/info`` | model metadata, gallery list, whether the browse view has a test set |
| ``POST /api/search?k=`` | an image (raw body or multipart field ``image``) -> top-k as JSON |
| ``GET /api/gallery/{id}/neighbours?k=`` | a gallery image as the query (itself left out) |
| ``GET /api/browse`` and ``/api/browse/{id}?k=`` | the test set, and one test image's neighbours |
| ``GET /gallery/{id}``, ``GET /browse/image/{id}`` | image files, by position only |

Files are served by their position in lists built at start-up (``gallery_files`` follows no
symlink out of the gallery), never by a path from the request, so ``..`` cannot reach anything
else. Bad uploads get a 400 (not an image, truncated) or 413 (too many bytes, too many pixels:
a decompression bomb) with a one-line ``{"error": ...}``; decoding and embedding run in a
worker thread, so one slow upload does not stall the others.
"""
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from triplet.deploy.neighbours import top_k
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS, open_rgb
from triplet.errors import UserError
from triplet.fileio import NPZ_ERRORS

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_K = 100


class ApiError(Exception):
    """An HTTP error with a one-line message for the page and for scripts."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def decode_upload(data, max_pixels):
    """Uploaded bytes -> an RGB PIL image; refuses non-images (400) and pixel bombs (413)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"upload: refused as a decompression bomb ({e})") from e
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ApiError(400, "upload: not an image (JPEG, PNG, BMP, WebP or TIFF expected)") from e
    if width * height > max_pixels:
        raise ApiError(413, f"upload: {width} x {height} pixels is over the limit of {max_pixels} "
                            f"(a decompression bomb?; --max-pixels); send a smaller image")
    try:
        return open_rgb(io.BytesIO(data), max_pixels)
    except (UserError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"upload: not a readable image ({e.__cause__ or e})") from e


async def read_upload(request, max_bytes):
    """The uploaded file's bytes, from a raw body or a multipart form; over ``max_bytes`` -> 413."""
    too_big = ApiError(413, f"upload: larger than the {max_bytes // 2**20} MB limit (--max-upload-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + 64 * 1024:  # room for multipart framing
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes + 64 * 1024:
            raise too_big
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        try:
            form = await Request(request.scope, replay).form()
        except HTTPException as e:  # Starlette's word for a malformed form
            raise ApiError(400, f"upload: not a readable multipart form ({e.detail}); send the file as the "
                                f"field 'image', or as the raw body") from e
        upload = form.get("image") or next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None or not hasattr(upload, "read"):
            raise ApiError(400, "upload: no file in the form; send it as the field 'image'")
        body = await upload.read()
    if len(body) > max_bytes:
        raise too_big
    if not body:
        raise ApiError(400, "upload: empty; choose an image file")
    return bytes(body)


def load_browse_set(run_dir):
    """A run's test set from ``test_embeddings.npz`` (scripts/evaluate.py): embeddings, labels, paths."""
    path = Path(run_dir) / "test_embeddings.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings, labels, paths = data["embeddings"], data["labels"], [Path(p) for p in data["paths"]]
    except FileNotFoundError as e:
        raise UserError(f"--run {run_dir}: has no test_embeddings.npz; run scripts/evaluate.py --run {run_dir}") from e
    except NPZ_ERRORS as e:
        raise UserError(f"{path}: damaged ({e}); run scripts/evaluate.py --run {run_dir} again") from e
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return {"embeddings": embeddings.astype(np.float32), "labels": labels, "paths": paths,
            "classes": [p.parent.name for p in paths]}


def model_summary(metadata, metrics=None):
    """What the page's header shows about the model."""
    metrics = metrics or metadata.get("test_metrics") or {}
    return {"backbone": metadata.get("backbone"), "embedding_dim": metadata.get("embedding_dim"),
            "image_size": metadata.get("image_size"), "precision": metadata.get("precision", "fp32"),
            "test_precision_at_1": metrics.get("precision_at_1"), "source_run": metadata.get("source_run")}


def _k(request, default):
    value = request.query_params.get("k", str(default))
    if not value.isdigit() or not 1 <= int(value) <= MAX_K:
        raise ApiError(400, f"k={value}: must be a whole number from 1 to {MAX_K}")
    return int(value)


def _position(request, size):
    value = request.path_params["id"]
    if not 0 <= value < size:
        raise ApiError(404, f"no image {value}")
    return value


def create_app(embedder, gallery, browse=None, top_k_default=8, max_upload_bytes=20 * 2**20,
               max_pixels=DEFAULT_MAX_PIXELS, metrics=None):
    classes = gallery.classes()
    info = {"model": model_summary(embedder.metadata, metrics), "index": gallery.index.kind,
            "gallery": [{"id": i, "path": r, "class": c} for i, (r, c) in enumerate(zip(gallery.rel, classes))],
            "skipped": len(gallery.skipped), "browse": browse is not None, "top_k": top_k_default}

    def matches(indices, sims):
        return [{"rank": rank, "id": int(i), "path": gallery.rel[i], "class": classes[i], "score": round(float(s), 4),
                 "url": f"/gallery/{int(i)}"} for rank, (i, s) in enumerate(zip(indices, sims), 1) if i >= 0]

    async def page(request):
        return HTMLResponse(PAGE.read_text())

    async def health(request):
        return JSONResponse({"status": "ok", "gallery_size": len(gallery), "index": gallery.index.kind,
                             "model": info["model"]["backbone"]})

    async def api_info(request):
        return JSONResponse(info)

    async def search(request):
        k = _k(request, top_k_default)
        data = await read_upload(request, max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data, max_pixels)
        query = await run_in_threadpool(embedder.embed, [image])
        indices, sims = await run_in_threadpool(gallery.search, query, k)
        return JSONResponse({"query_class": None, "results": matches(indices[0], sims[0])})

    async def gallery_neighbours(request):
        i, k = _position(request, len(gallery)), _k(request, top_k_default)
        indices, sims = gallery.search(gallery.embeddings[i:i + 1], k, exclude=[i])
        return JSONResponse({"query": {"id": i, "path": gallery.rel[i], "class": classes[i], "url": f"/gallery/{i}"},
                             "query_class": classes[i], "results": matches(indices[0], sims[0])})

    async def gallery_image(request):
        path = gallery.files[_position(request, len(gallery))]
        if not path.resolve().is_relative_to(gallery.root):  # swapped for a symlink since start-up
            raise ApiError(404, "not inside the gallery")
        return FileResponse(path)

    async def browse_list(request):
        if browse is None:
            raise ApiError(404, "no test set: start the server with --run RUN_DIR")
        return JSONResponse({"items": [{"id": i, "name": p.name, "class": c, "label": int(label)} for i, (p, c, label)
                                       in enumerate(zip(browse["paths"], browse["classes"], browse["labels"]))]})

    async def browse_query(request):
        if browse is None:
            raise ApiError(404, "no test set: start the server with --run RUN_DIR")
        i, k = _position(request, len(browse["paths"])), _k(request, top_k_default)
        indices, sims = top_k(browse["embeddings"][i:i + 1], browse["embeddings"], k, exclude=[i])
        label = browse["labels"][i]
        return JSONResponse({
            "query": {"id": i, "name": browse["paths"][i].name, "class": browse["classes"][i],
                      "url": f"/browse/image/{i}"},
            "results": [{"rank": rank, "id": int(j), "name": browse["paths"][j].name, "class": browse["classes"][j],
                         "score": round(float(s), 4), "correct": bool(browse["labels"][j] == label),
                         "url": f"/browse/image/{int(j)}"} for rank, (j, s) in enumerate(zip(indices[0], sims[0]), 1)]})

    async def browse_image(request):
        if browse is None:
            raise ApiError(404, "no test set")
        path = browse["paths"][_position(request, len(browse["paths"]))]
        if not path.is_file():
            raise ApiError(404, f"{path.name}: no longer on disk")
        return FileResponse(path)

    async def api_error(request, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def http_error(request, error):
        """Starlette's own errors (no such route, e.g. a negative id; a wrong method): JSON under /api/
        like every other API error, plain text for the page's files as Starlette gives them."""
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": f"{request.url.path}: {error.detail}"}, status_code=error.status_code,
                                headers=error.headers)
        return PlainTextResponse(error.detail, status_code=error.status_code, headers=error.headers)

    routes = [Route("/", page), Route("/api/health", health), Route("/api/info", api_info),
              Route("/api/search", search, methods=["POST"]),
              Route("/api/gallery/{id:int}/neighbours", gallery_neighbours),
              Route("/gallery/{id:int}", gallery_image), Route("/api/browse", browse_list),
              Route("/api/browse/{id:int}", browse_query), Route("/browse/image/{id:int}", browse_image)]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
