"""Inference speed: PyTorch eager versus onnxruntime fp32 and INT8, same model, same inputs, one process.

    python scripts/benchmark_onnx.py --out results/onnx_benchmark.json     # `make bench`
    python scripts/benchmark_onnx.py --model exports/exp7-resnet18.onnx --iterations 20

Times batch-1 latency (p50, p90 ms) and batch throughput (images/s, from the median call)
after a warm-up, for:
PyTorch eager fp32, its best CPU setting (channels_last; plus bf16 autocast where the CPU has
AVX-512 bf16 or AMX), onnxruntime fp32 and onnxruntime static INT8. Each result is also given
as a ratio to PyTorch eager fp32 (> 1 is faster). Speed does not depend on the weights, so by
default a random-init model of --backbone is exported to a temporary folder and its INT8 model
is calibrated on random inputs. The CPU may be shared: the share of it that other processes
used while each setting was timed is recorded beside its numbers. Writes the JSON (--out) and
a Markdown table beside it (same name, .md).
"""
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from triplet.bench.cpu import cpu_seconds, others_cell, others_share

from triplet.cli import check, run
from triplet.deploy.inference import OnnxEmbedder
from triplet.backbones import DEFAULT_BACKBONE, check_backbone
from triplet.deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_size_for


@dataclass
class Options:
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={
        "help": "architecture (without --model): a torchvision model name"})
    embedding_dim: int = field(default=128, metadata={"help": "embedding size (without --model)"})
    image_size: int = field(default=224, metadata={"help": "input size (without --model)"})
    model: str = field(default="", metadata={"help": "an exported .onnx to time (its <name>.int8.onnx too, if "
                                                     "present); default: export a random-init --backbone"})
    batch_size: int = field(default=32, metadata={"help": "batch of the throughput measurement"})
    iterations: int = field(default=10, metadata={"help": "timed calls per setting and batch size"})
    warmup: int = field(default=3, metadata={"help": "untimed calls first"})
    threads: int = field(default=0, metadata={"help": "intra-op threads for torch and onnxruntime (0: all usable cores)"})
    out: str = field(default="results/onnx_benchmark.json", metadata={"help": "JSON to write; Markdown beside it"})

    def __post_init__(self):
        check_backbone(self.backbone)
        check(self.out.endswith(".json"), f"--out {self.out}: must end with .json")
        for name in ("embedding_dim", "image_size", "batch_size", "iterations"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        check(self.warmup >= 0 and self.threads >= 0, "--warmup and --threads must be >= 0")


def time_calls(fn, batch, iterations, warmup):
    """Seconds of each of ``iterations`` calls of ``fn(batch)``, after ``warmup`` untimed calls.

    Settings are timed one after another, each behind its own warm-up, not in turns call by
    call: a runtime's worker threads keep spinning for a while after a call (onnxruntime's and
    OpenMP's default) and would compete with the next runtime's.
    """
    for _ in range(warmup):
        fn(batch)
    seconds = np.zeros(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        fn(batch)
        seconds[i] = time.perf_counter() - start
    return seconds


def torch_runner(model, channels_last=False, bf16=False):
    """A batch -> embeddings callable on a private copy (``Module.to`` converts in place)."""
    import torch

    model = copy.deepcopy(model).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @torch.inference_mode()
    def call(batch):
        x = torch.from_numpy(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x).float().numpy()
    return call


def measure(settings, inputs, opts):
    """Batch-1 latency (p50, p90) and batch throughput (from the median call) of every setting."""
    key = f"batch{len(inputs)}_images_per_s"
    results = []
    for name, fn in settings:
        start, wall = cpu_seconds(), time.perf_counter()
        latency = time_calls(fn, inputs[:1], opts.iterations, opts.warmup) * 1000
        seconds = time_calls(fn, inputs, opts.iterations, opts.warmup)
        others = others_share(start, cpu_seconds(), time.perf_counter() - wall)
        results.append({"setting": name, "batch1_p50_ms": float(np.percentile(latency, 50)),
                        "batch1_p90_ms": float(np.percentile(latency, 90)),
                        key: float(len(inputs) / np.median(seconds)), "others_cpu_share": others})
        print(f"  {name:<44} batch 1 p50 {results[-1]['batch1_p50_ms']:7.1f} ms   batch {len(inputs)} "
              f"{results[-1][key]:7.1f} images/s" + (f"   (other processes: {others:.0%} of the CPU)"
                                                   if others is not None else ""), flush=True)
    return results


def prepare_models(opts, folder):
    """(fp32 path, int8 path, metadata): the given model, or a random-init one exported here."""
    import torch  # torch and the model are imported where used, so that --help is instant

    from triplet.deploy.export import export_model, quantize_int8
    from triplet.model import EmbeddingNet

    if opts.model:
        fp32 = Path(opts.model)
        metadata = OnnxEmbedder(fp32).metadata
        int8 = fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.onnx")
        if int8.exists():
            return fp32, int8, metadata
    else:
        torch.manual_seed(0)
        model = EmbeddingNet(opts.backbone, opts.embedding_dim, opts.image_size).eval()
        metadata = {"backbone": opts.backbone, "embedding_dim": opts.embedding_dim, "image_size": opts.image_size,
                    "resize_size": resize_size_for(opts.image_size), "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD), "source_run": "random-init", "test_metrics": {}, "precision": "fp32"}
        fp32 = Path(folder) / "model.onnx"
        export_model(model, fp32, metadata)
    int8 = Path(folder) / "model.int8.onnx"
    size = metadata["image_size"]
    rng = np.random.default_rng(1)
    calibration = (rng.standard_normal((8, 3, size, size), dtype=np.float32) for _ in range(4))
    print(f"quantising {fp32} to INT8 for timing (calibrated on random inputs)", flush=True)
    quantize_int8(fp32, int8, calibration, metadata)
    return fp32, int8, metadata


def markdown(report):
    key = f"batch{report['batch_size']}_images_per_s"
    lines = [f"Inference on {report['cpu']} ({report['threads']} threads), {report['backbone']} at "
             f"{report['image_size']} px, {report['iterations']} timed calls after {report['warmup']} warm-up; "
             f"throughput from the median call. Ratios are to PyTorch eager fp32 (> 1: faster).", "",
             f"| Setting | batch 1 p50 (ms) | batch 1 p90 (ms) | latency ratio | batch {report['batch_size']} "
             f"(images/s) | throughput ratio | CPU used by others |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        others = others_cell(r["others_cpu_share"])
        lines.append(f"| {r['setting']} | {r['batch1_p50_ms']:.1f} | {r['batch1_p90_ms']:.1f} | "
                     f"{r['latency_ratio']:.2f}x | {r[key]:.1f} | {r['throughput_ratio']:.2f}x | {others} |")
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(opts):
    import torch

    from triplet.bench.timing import write_results
    from triplet.model import EmbeddingNet
    from triplet.machine import cpu_name, usable_cores
    from triplet.runtime import cpu_has_bf16

    threads = opts.threads or usable_cores()
    torch.set_num_threads(threads)
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        fp32_path, int8_path, meta = prepare_models(opts, folder)
        size = meta["image_size"]
        inputs = np.random.default_rng(0).standard_normal((opts.batch_size, 3, size, size), dtype=np.float32)
        torch.manual_seed(0)
        model = EmbeddingNet(meta["backbone"], meta["embedding_dim"], meta["image_size"]).eval()  # same architecture; speed ignores weights
        settings = [("PyTorch eager fp32", torch_runner(model)),
                    ("PyTorch channels_last fp32", torch_runner(model, channels_last=True))]
        if cpu_has_bf16():
            settings.append(("PyTorch channels_last bf16 autocast", torch_runner(model, True, bf16=True)))
        else:
            notes.append("PyTorch bf16 autocast: not timed, this CPU has no AVX-512 bf16 or AMX "
                         "(triplet.runtime.cpu_has_bf16() is False), where bf16 is slower than fp32.")
        settings += [("onnxruntime fp32", OnnxEmbedder(fp32_path, threads=threads).run),
                     ("onnxruntime INT8 (static QDQ, per-channel)", OnnxEmbedder(int8_path, threads=threads).run)]
        load_before = os.getloadavg()
        print(f"timing {meta['backbone']} at {size} px on {threads} threads, {opts.iterations} calls each", flush=True)
        results = measure(settings, inputs, opts)
        load_after = os.getloadavg()
    key = f"batch{opts.batch_size}_images_per_s"
    for r in results:
        r["latency_ratio"] = results[0]["batch1_p50_ms"] / r["batch1_p50_ms"]
        r["throughput_ratio"] = r[key] / results[0][key]
        print(f"  {r['setting']:<44} {r['throughput_ratio']:5.2f}x eager fp32 throughput, "
              f"{r['latency_ratio']:5.2f}x batch-1 latency")
    report = {"backbone": meta["backbone"], "image_size": size, "embedding_dim": meta["embedding_dim"],
              "model": opts.model or "random-init (exported to a temporary folder)", "batch_size": opts.batch_size,
              "iterations": opts.iterations, "warmup": opts.warmup, "threads": threads, "cores": usable_cores(),
              "cpu": cpu_name(), "cpu_has_bf16": cpu_has_bf16(), "torch": str(torch.__version__),
              "onnxruntime": ort.__version__, "load_average_before": list(load_before),
              "load_average_after": list(load_after), "results": results, "notes": notes}
    write_results(opts.out, report, markdown(report))


if __name__ == "__main__":
    run(main, Options, __doc__)
