"""A local web page that finds similar images, and its JSON API, over an exported model.

    python scripts/serve.py --model exports/demo-resnet18.onnx --gallery data/demo/prepared/official-r37-val0.25-seed0/images
    curl -s -X POST --data-binary @bird.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/api/search?k=5

Open http://127.0.0.1:8000/ : drop a photo (or click a gallery image) to see its nearest gallery
images with scores and classes; "Browse the test set" shows a run's test images and their
neighbours, marked right or wrong (--run, default: the model's own run when it is on disk).
Listens on 127.0.0.1 only unless --host says otherwise. Torch-free: onnxruntime, NumPy, Pillow,
Starlette and uvicorn (plus faiss-cpu for --index faiss). See docs/deploy.md.
"""
import errno
import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from triplet.cli import check, run
from triplet.deploy.gallery import GalleryOptions, load_gallery
from triplet.deploy.inference import OnnxEmbedder
from triplet.deploy.server import create_app, load_browse_set
from triplet.errors import UserError
from triplet.fileio import read_json


@dataclass
class Options(GalleryOptions):
    run: str = field(default="", metadata={"help": "run folder whose test_embeddings.npz the browse view "
                                           "shows (default: the model's source run, when on disk)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on; anything but loopback "
                                                     "exposes the gallery to the network"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    top_k: int = field(default=8, metadata={"help": "matches shown per query"})
    max_upload_mb: float = field(default=20.0, metadata={"help": "largest upload accepted, in MB (413 above)"})

    def __post_init__(self):
        super().__post_init__()
        check(0 <= self.port <= 65535, "--port must be from 0 to 65535")
        check(1 <= self.top_k <= 100, "--top-k must be from 1 to 100")
        check(self.max_upload_mb > 0, "--max-upload-mb must be > 0")


def log(message):
    print(message, file=sys.stderr, flush=True)


def check_port(host, port):
    """Fail with one line now, rather than in uvicorn's log, when the address cannot be bound; a port in
    use (or reserved for root) is --port's fault, anything else (no such name, not this machine's) --host's."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                            f"choose another --port") from e
        raise UserError(f"--host {host}: cannot listen there ({e.strerror}); give an address of this machine "
                        f"(127.0.0.1, or 0.0.0.0 for all of them) or a name that resolves to one") from e


def browse_run(opts, embedder):
    """The run folder for the browse view: --run, else the model's source run if it is still on disk."""
    if opts.run:
        return Path(opts.run)
    source = embedder.metadata.get("source_run")
    if source and (Path(source) / "test_embeddings.npz").is_file():
        return Path(source)
    return None


def main(opts):
    import uvicorn  # here: --help and option errors stay fast

    check_port(opts.host, opts.port)
    embedder = OnnxEmbedder(opts.model, max_pixels=opts.max_pixels)
    gallery = load_gallery(embedder, opts.gallery, opts.cache or None, opts.index, opts.batch_size,
                           progress=True, log=log, use_cache=not opts.no_cache)
    run_dir = browse_run(opts, embedder)
    browse = load_browse_set(run_dir) if run_dir else None
    metrics = read_json(run_dir / "metrics.json") if run_dir and (run_dir / "metrics.json").is_file() else None
    app = create_app(embedder, gallery, browse, opts.top_k, int(opts.max_upload_mb * 2**20),
                     opts.max_pixels, metrics)
    try:
        loopback = ipaddress.ip_address(opts.host).is_loopback
    except ValueError:
        loopback = opts.host == "localhost"
    if not loopback:
        log(f"warning: listening on {opts.host}: anyone who can reach this machine can search and see the gallery")
    log(f"gallery: {len(gallery)} images ({gallery.index.kind} index)"
        + (f"; browse: {len(browse['paths'])} test images of {run_dir}" if browse else "; no test set to browse"))
    log(f"serving http://{opts.host}:{opts.port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning")


if __name__ == "__main__":
    run(main, Options, __doc__)
