"""ONNX export (scripts/export_onnx.py, triplet.deploy.export) and the inference benchmark, on the tiny run."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import call_script
from triplet.checkpoint import model_from_checkpoint
from triplet.deploy.export import OPSET, best_run, verify
from triplet.errors import UserError
from triplet.fileio import read_json, write_json
from triplet.deploy.inference import OnnxEmbedder, decode_metadata
from triplet.data.prepare import prepared_dir, read_manifest, run_data_options


def split_paths(run_dir, split="test"):
    options = read_json(run_dir / "config.json")["options"]
    return read_manifest(prepared_dir(run_data_options(options)), split)[0]


def fake_run(results, name, source, precision_at_1, checkpoint=True):
    """A run folder under ``results`` that shares ``source``'s checkpoint but claims its own score."""
    run_dir = results / name
    run_dir.mkdir(parents=True)
    shutil.copy(source / "config.json", run_dir / "config.json")
    metrics = read_json(source / "metrics.json") | {"precision_at_1": precision_at_1}
    if checkpoint:
        os.symlink(source / "checkpoint_best.pt", run_dir / "checkpoint_best.pt")
    else:
        metrics["checkpoint"] = "none"
    write_json(run_dir / "metrics.json", metrics)
    return run_dir


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """`export_onnx.py --int8` with every default, run in a folder holding three runs."""
    cwd = tmp_path_factory.mktemp("export")
    fake_run(cwd / "results", "best", tiny_run, 50.0)
    fake_run(cwd / "results", "worse", tiny_run, 40.0)
    fake_run(cwd / "results", "baseline", tiny_run, 90.0, checkpoint=False)  # untrained trunk: not exportable
    before = os.getcwd()
    os.chdir(cwd)
    try:
        status, output = call_script("export_onnx", "--int8", "--calibration-images", 16, "--max-drop", 100)
    finally:
        os.chdir(before)
    assert status == 0, output
    return cwd, output


def test_default_export_picks_the_best_exportable_run(exported):
    cwd, stdout = exported
    assert "exporting results/best" in stdout
    assert (cwd / "exports" / "best.onnx").is_file() and (cwd / "exports" / "best.int8.onnx").is_file()
    assert best_run(cwd / "results") == cwd / "results" / "best"


def test_graph_metadata_and_checker(exported, tiny_run):
    proto = onnx.load(exported[0] / "exports" / "best.onnx")
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= OPSET >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("images", "embeddings")
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props}, "best.onnx")
    options = read_json(tiny_run / "config.json")["options"]
    assert (meta["backbone"], meta["embedding_dim"], meta["image_size"]) == \
           (options["backbone"], options["embedding_dim"], 32)
    assert meta["resize_size"] == 37 and len(meta["mean"]) == len(meta["std"]) == 3
    assert meta["source_run"] == "results/best" and meta["test_metrics"]["precision_at_1"] == 50.0


def test_parity_with_torch_at_batch_1_and_7(exported, tiny_run):
    embedder = OnnxEmbedder(exported[0] / "exports" / "best.onnx")
    model, _ = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    paths = split_paths(tiny_run)[:7]
    for batch_size in (1, 7):
        batch = embedder.preprocess(paths[:batch_size])
        got = embedder.run(batch)
        with torch.inference_mode():
            expected = model(torch.from_numpy(batch)).numpy()
        assert got.shape == (batch_size, 128)
        assert np.abs(got - expected).max() <= 1e-4
        assert ((got * expected).sum(1) >= 0.9999).all()
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_int8_model_is_accepted_within_max_drop(exported):
    cwd, stdout = exported
    assert "INT8" in stdout and "drop" in stdout
    int8 = OnnxEmbedder(cwd / "exports" / "best.int8.onnx")
    assert int8.metadata["precision"] == "int8" and "precision_at_1_int8" in int8.metadata["int8_check"]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(int8.path).graph.node)
    assert int8.embed(split_paths(cwd / "results" / "best")[:3]).shape == (3, 128)


def test_int8_refused_when_the_drop_is_too_large(tiny_run, tmp_path, monkeypatch):
    from triplet.deploy import export

    out = tmp_path / "m.onnx"
    (tmp_path / "m.int8.onnx").write_bytes(b"stale")  # an older accepted model must not survive
    # a tiny random model's INT8 may lose nothing: the measured P@1 pair is set to a 10-point drop
    monkeypatch.setattr(export, "precision_at_1", lambda *args, **kwargs: (50.0, 40.0))
    status, output = call_script("export_onnx", "--run", tiny_run, "--out", out, "--int8", "--calibration-images",
                                 8, "--max-drop", 1, "--verify-images", 4)
    error = output.strip().splitlines()[-1]
    assert status == 3 and "error:" in error and "more than --max-drop" in error and "kept aside" in error
    assert out.is_file() and (tmp_path / "m.int8.rejected.onnx").is_file()
    assert not (tmp_path / "m.int8.onnx").exists() and "the earlier INT8 model, made from another fp32 one, was removed" in error
    monkeypatch.setattr(export, "precision_at_1", lambda *args, **kwargs: (50.0, 49.5))
    status, output = call_script("export_onnx", "--run", tiny_run, "--out", out, "--int8", "--calibration-images",
                                 8, "--max-drop", 1, "--verify-images", 4)
    assert status == 0 and (tmp_path / "m.int8.onnx").is_file(), output
    assert not (tmp_path / "m.int8.rejected.onnx").exists() and "which an earlier export had kept aside" in output


def test_verification_reports_by_how_much_it_failed(exported, tiny_run):
    model, _ = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    with torch.no_grad():
        model.head.bias += 0.05  # a model that no longer matches the export
    with pytest.raises(UserError, match=r"max \|difference\| .* lowest cosine"):
        verify(model, exported[0] / "exports" / "best.onnx", split_paths(tiny_run)[:4])


def test_clear_errors_without_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    status, output = call_script("export_onnx")
    assert status == 2 and "no evaluated run" in output and "--run" in output
    status, output = call_script("export_onnx", "--run", tmp_path / "missing")
    assert status == 2 and "run folder not found" in output and len(output.strip().splitlines()) == 1


def test_benchmark_script_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    status, output = call_script("benchmark_onnx", "--image-size", 32, "--iterations", 2, "--warmup", 1,
                                 "--batch-size", 4, "--out", out)
    assert status == 0, output
    report = json.loads(out.read_text())
    settings = [r["setting"] for r in report["results"]]
    assert settings[0] == "PyTorch eager fp32" and "onnxruntime fp32" in settings
    assert any("INT8" in s for s in settings)
    assert report["results"][0]["throughput_ratio"] == 1.0 and report["threads"] >= 1
    assert isinstance(report["cpu_has_bf16"], bool)
    assert all(r["batch1_p90_ms"] >= r["batch1_p50_ms"] > 0 and r["batch4_images_per_s"] > 0
               for r in report["results"])
    assert "| onnxruntime fp32 |" in (tmp_path / "bench.md").read_text()
