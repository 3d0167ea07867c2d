"""ONNX export of a trained run: export, metadata, verification against torch, INT8 quantisation.

The export is trusted only after it is checked: every fp32 export is compared with the torch
model on real test images (through the deployed preprocessing, ``OnnxEmbedder``), and an INT8
model is kept as the deployable one only if its test Precision@1 stays within ``max_drop``
points of fp32's. A model that fails is renamed ``*.rejected.onnx`` and the exit is non-zero.
"""
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from triplet.checkpoint import checkpoint_options, model_from_checkpoint
from triplet.errors import QualityGateError, UserError
from triplet.fileio import atomic_path
from triplet.deploy.inference import OnnxEmbedder, encode_metadata
from triplet.metrics import retrieval_metrics
from triplet.data.prepare import prepared_dir, query_mask, read_manifest, run_data_options
from triplet.deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_size_for
from triplet.runs import find_runs, read_metrics, require_run_dir
from triplet.data.transforms import EvalTransform

OPSET = 17
MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.9999


def best_run(results_dir):
    """The exportable run (a checkpoint, evaluated) with the best test Precision@1."""
    for run_dir, metrics in find_runs(results_dir):
        if (run_dir / "checkpoint_best.pt").exists() and metrics.get("checkpoint") != "none":
            return run_dir
    raise UserError(f"--results {results_dir}: no evaluated run with a checkpoint_best.pt under it; train "
                    f"and evaluate one (e.g. `make exp1`) or pass --run RUN_DIR")


def load_run(run_dir, data_dir=""):
    """(model in eval mode, train options, test metrics, DataOptions) of a finished, evaluated run."""
    run_dir = require_run_dir(run_dir)
    require_run_dir(run_dir, needs="metrics.json")
    model, checkpoint = model_from_checkpoint(run_dir / "checkpoint_best.pt")
    options = checkpoint_options(checkpoint, run_dir / "checkpoint_best.pt")
    return model, options, read_metrics(run_dir / "metrics.json"), run_data_options(options, data_dir)


def run_metadata(run_dir, options, metrics):
    """What a deployed model must know about itself: architecture, preprocessing, provenance."""
    size = options["image_size"]
    return {"backbone": options["backbone"], "embedding_dim": options["embedding_dim"], "image_size": size,
            "resize_size": resize_size_for(size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "source_run": str(run_dir), "checkpoint": "checkpoint_best.pt", "test_metrics": metrics,
            "precision": "fp32", "opset": OPSET, "torch": str(torch.__version__)}


def _unshare_initializers(graph):
    """Turn ``Identity(initializer)`` nodes back into initializers.

    The exporter deduplicates equal tensors (e.g. the all-zero conv biases of a random-init
    model) and feeds them through Identity nodes; onnxruntime's quantiser then cannot fold such
    a bias into an integer Conv and leaves it in float, several times slower.
    """
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = graph.initializer.add()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def save_with_metadata(proto, path, metadata):
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, encode_metadata(metadata))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_model(model, path, metadata):
    """torch -> ONNX: input ``images`` N x 3 x S x S, output ``embeddings`` N x D, dynamic batch."""
    size = metadata["image_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: chosen on purpose
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    proto = onnx.load(str(path))
    _unshare_initializers(proto.graph)
    save_with_metadata(proto, path, metadata)


def sample(items, n):
    """``n`` items spread evenly over ``items`` (all of them when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


@torch.inference_mode()
def verify(model, path, image_paths, batch_size=64):
    """onnxruntime (deployed preprocessing) versus torch (EvalTransform) on the same images."""
    embedder = OnnxEmbedder(path)
    transform = EvalTransform(embedder.image_size)
    expected = np.concatenate([model(torch.stack([transform(p) for p in image_paths[i:i + batch_size]])).numpy()
                               for i in range(0, len(image_paths), batch_size)])
    got = embedder.embed(image_paths, batch_size)
    max_diff = float(np.abs(got - expected).max())
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    result = {"images": len(image_paths), "max_abs_diff": max_diff, "min_cosine": float(cosine.min())}
    if max_diff > MAX_ABS_DIFF or result["min_cosine"] < MIN_COSINE:
        raise UserError(f"{path}: onnxruntime disagrees with torch on {len(image_paths)} test images: max "
                        f"|difference| {max_diff:.3g} (allowed {MAX_ABS_DIFF:g}), lowest cosine "
                        f"{result['min_cosine']:.6f} (required {MIN_COSINE})")
    return result


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of float32 batches."""

    def __init__(self, batches, input_name="images"):
        self.batches, self.input_name = iter(batches), input_name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self):  # some calibrators ask; one pass is all MinMax needs
        pass


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantiser logs advice through the root logger; keep the user's console readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path, out_path, batches, metadata):
    """Static INT8 (QDQ, per-channel weights, MinMax ranges) calibrated on ``batches``.

    Activations are unsigned (U8S8): with signed activations onnxruntime's CPU provider fused
    only 9 of ResNet18's 20 convolutions into integer kernels on an AVX2 CPU (slower than
    fp32), with unsigned ones all 20 and the residual Adds. ``reduce_range`` keeps weights to 7
    bits, so CPUs without VNNI (AVX2, AVX-512) cannot saturate their 16-bit intermediate sums.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + fusions the quantiser expects
            quant_pre_process(str(fp32_path), str(prepared))
        except AssertionError:  # symbolic inference fails on a ViT's dynamic-batch reshape; ONNX's own suffices
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), _Batches(batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    save_with_metadata(onnx.load(str(out_path)), out_path, {**metadata, "precision": "int8"})


def image_batches(embedder, paths, batch_size=32):
    for i in range(0, len(paths), batch_size):
        yield embedder.preprocess(paths[i:i + batch_size])


def precision_at_1(embedders, paths, labels, batch_size=64, is_query=None):
    """Test Precision@1 of each model (under the run's retrieval protocol), every image preprocessed once."""
    outputs = [[] for _ in embedders]
    for batch in image_batches(embedders[0], paths, batch_size):
        for out, embedder in zip(outputs, embedders):
            out.append(embedder.run(batch))
    return [retrieval_metrics(np.concatenate(out), labels, with_nmi=False, is_query=is_query)["precision_at_1"]
            for out in outputs]


def _keep_aside_path(path):
    return path.with_name(path.name.removesuffix(".onnx") + ".rejected.onnx")


def _keep_aside(tmp, path):
    rejected = _keep_aside_path(path)
    os.replace(tmp, rejected)
    return rejected


def export_run(run_dir, out, int8=False, calibration_images=300, max_drop=1.0, verify_images=128,
               data_dir="", log=print):
    """Export, verify and optionally quantise one run; returns {"fp32": path, "int8": path or None}."""
    model, options, metrics, data = load_run(run_dir, data_dir)
    test_paths, test_labels = read_manifest(prepared_dir(data), "test")
    metadata = run_metadata(run_dir, options, metrics)
    out = Path(out)
    with atomic_path(out) as tmp:
        export_model(model, tmp, metadata)
        try:
            check = verify(model, tmp, sample(test_paths, verify_images))
        except UserError as e:
            raise QualityGateError(f"{e}; kept aside as {_keep_aside(tmp, out)}") from e
    log(f"wrote {out}: {check['images']} test images agree with torch (max |difference| "
        f"{check['max_abs_diff']:.2g}, lowest cosine {check['min_cosine']:.6f})")
    int8_out = out.with_name(out.name.removesuffix(".onnx") + ".int8.onnx")
    if not int8:
        if int8_out.exists():
            log(f"note: {int8_out} comes from an earlier export; refresh it with --int8 or remove it")
        return {"fp32": out, "int8": None}
    train_paths, _ = read_manifest(prepared_dir(data), "train")
    fp32 = OnnxEmbedder(out)
    calibration = sample(train_paths, calibration_images)
    log(f"quantising to INT8 (static QDQ, per-channel U8S8), calibrated on {len(calibration)} training images")
    with atomic_path(int8_out) as tmp:
        quantize_int8(out, tmp, image_batches(fp32, calibration), metadata)
        p_fp32, p_int8 = precision_at_1([fp32, OnnxEmbedder(tmp)], test_paths, test_labels,
                                        is_query=query_mask(prepared_dir(data), test_paths))
        drop = p_fp32 - p_int8
        log(f"test Precision@1 on {len(test_paths)} images: fp32 {p_fp32:.2f} (torch, metrics.json: "
            f"{metrics.get('precision_at_1', float('nan')):.2f}), INT8 {p_int8:.2f} (drop {drop:.2f} points, "
            f"allowed {max_drop:g})")
        check = {"precision_at_1_fp32": round(p_fp32, 4), "precision_at_1_int8": round(p_int8, 4),
                 "calibration_images": len(calibration), "max_drop": max_drop}
        save_with_metadata(onnx.load(str(tmp)), tmp, {**metadata, "precision": "int8", "int8_check": check})
        rejected = _keep_aside_path(int8_out)
        if drop > max_drop:
            removed = int8_out.exists()  # an older INT8 model no longer matches this fp32 one
            int8_out.unlink(missing_ok=True)
            os.replace(tmp, rejected)
            raise QualityGateError(f"{int8_out}: INT8 loses {drop:.2f} points of test Precision@1 ({p_fp32:.2f} -> "
                            f"{p_int8:.2f}), more than --max-drop {max_drop:g}; kept aside as {rejected}"
                            f"{' (the earlier INT8 model, made from another fp32 one, was removed)' if removed else ''}, "
                            f"deploy the fp32 model {out}")
    log(f"wrote {int8_out}")
    if rejected.exists():  # an earlier export's refusal, beside a model that now passed
        rejected.unlink()
        log(f"removed {rejected}, which an earlier export had kept aside")
    return {"fp32": out, "int8": int8_out}
