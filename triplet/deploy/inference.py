"""Deployment: embed images with an exported ONNX model, using onnxruntime, NumPy and Pillow only.

No torch here, on purpose: a service that embeds bird photos should not need a 1 GB training
stack. The model file carries everything needed besides its weights (backbone, embedding size,
input size, resize size, mean, std, source run) as JSON-encoded ``metadata_props``, and the
preprocessing is ``triplet.deploy.preprocess.preprocess``, the very function the torch evaluation
transform calls, so deployed embeddings match evaluation by construction.

The gallery (cache, index) behind scripts/search.py and scripts/serve.py is ``triplet.deploy.gallery``.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from triplet.errors import UserError, first_line
from triplet.deploy.preprocess import DEFAULT_MAX_PIXELS, open_rgb, preprocess

FORMAT = "triplet-embedding-onnx/1"
REQUIRED_METADATA = ("backbone", "embedding_dim", "image_size", "resize_size", "mean", "std")
MAX_RESIZE_SIZE = int(DEFAULT_MAX_PIXELS ** 0.5)  # 8000: a square resized to it is the --max-pixels default


def encode_metadata(metadata):
    """{key: value} -> {key: JSON string}: ONNX metadata_props hold strings only."""
    return {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items() if k != "format"}}


def decode_metadata(props, source, input_shape=None, output_shape=None):
    """The inverse of ``encode_metadata``; a model exported by anything else is refused by name, and metadata
    that disagrees with the graph's shapes as onnxruntime infers them (``session.get_inputs()[0].shape``...)
    as damaged, here rather than as a shape error deep in onnxruntime or NumPy."""
    if props.get("format") != FORMAT or any(k not in props for k in REQUIRED_METADATA):
        raise UserError(f"{source}: has no triplet metadata (backbone, image size, mean, std...); "
                        f"export it with scripts/export_onnx.py")
    try:
        metadata = {"format": FORMAT, **{k: json.loads(v) for k, v in props.items() if k != "format"}}
    except json.JSONDecodeError as e:
        raise damaged_metadata(source, e) from e
    problem = _metadata_problem(metadata) or _graph_problem(metadata, input_shape, output_shape)
    if problem:
        raise damaged_metadata(source, problem)
    return metadata


def damaged_metadata(source, problem):
    """The one error for metadata that cannot be trusted: only a fresh export repairs it."""
    return UserError(f"{source}: damaged triplet metadata ({problem}); export it again with scripts/export_onnx.py")


def _metadata_problem(metadata):
    """What is wrong with decoded metadata, in words, or None: each value as the exporter writes it."""
    for key in ("embedding_dim", "image_size", "resize_size"):
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key} {value!r} is not a positive integer"
    for key in ("image_size", "resize_size"):  # beyond it, resizing one photo is the decompression bomb
        if metadata[key] > MAX_RESIZE_SIZE:
            return f"{key} {metadata[key]} is over {MAX_RESIZE_SIZE} pixels"
    if metadata["resize_size"] < metadata["image_size"]:
        return (f"resize_size {metadata['resize_size']} is smaller than image_size {metadata['image_size']}, "
                f"the crop taken from the resized image")
    for key in ("mean", "std"):
        value = metadata[key]
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return f"{key} {value!r} is not a list of three numbers"
    if any(v <= 0 for v in metadata["std"]):
        return f"std {metadata['std']!r} has a value <= 0"
    if not isinstance(metadata["backbone"], str):
        return f"backbone {metadata['backbone']!r} is not a name"
    return None


def _graph_problem(metadata, input_shape, output_shape):
    """Where the metadata disagrees with the graph's static dims (N x 3 x S x S in, N x D out), or None;
    a dynamic dim (a name, or None) agrees with anything."""
    size, dim = metadata["image_size"], metadata["embedding_dim"]
    if input_shape and any(isinstance(d, int) and d != size for d in input_shape[2:]):
        return f"image_size {size}, but the model's input is {' x '.join(map(str, input_shape))}"
    if output_shape and isinstance(output_shape[-1], int) and output_shape[-1] != dim:
        return f"embedding_dim {dim}, but the model's output is {' x '.join(map(str, output_shape))}"
    return None


class OnnxEmbedder:
    """An exported EmbeddingNet: images (paths or PIL images) -> L2-normalised float32 embeddings."""

    def __init__(self, path, providers=None, threads=None, max_pixels=DEFAULT_MAX_PIXELS):
        self.path, self.max_pixels = Path(path), max_pixels
        if not self.path.is_file():
            raise UserError(f"{self.path}: model file not found; export one with scripts/export_onnx.py")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's warnings are for its developers, not users
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise UserError(f"{self.path}: not a loadable ONNX model ({first_line(e)})") from e
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map, self.path,
                                        self.session.get_inputs()[0].shape, self.session.get_outputs()[0].shape)
        self.input_name = self.session.get_inputs()[0].name
        self.image_size = int(self.metadata["image_size"])
        self.resize_size = int(self.metadata["resize_size"])
        self.embedding_dim = int(self.metadata["embedding_dim"])

    def preprocess(self, images):
        """Paths or PIL images -> float32 N x 3 x S x S, exactly as evaluation prepares them."""
        return np.stack([preprocess(open_rgb(image, self.max_pixels), self.image_size, self.resize_size,
                                    self.metadata["mean"], self.metadata["std"], self.max_pixels) for image in images])

    def run(self, batch):
        """A preprocessed float32 batch -> its embeddings."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def embed(self, images, batch_size=64):
        """Embed paths or PIL images (one, or a sequence) in batches; returns N x D float32."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        out = [self.run(self.preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.embedding_dim), np.float32)


def file_digest(path, length=16):
    """A short SHA-256 of a file: a model's or an image's identity in the gallery cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
