"""Training throughput: the suite's data path and step versus a straightforward implementation.

    python scripts/benchmark_train.py                                   # ResNet18 and ResNet34 at 224
    python scripts/benchmark_train.py --backbones resnet18 --steps 5 --warmup 2
    python scripts/benchmark_train.py --device cuda --steps 100 --warmup 10 --also-bf16

On the same synthetic CUB-size images (500x375 JPEGs, written to --workdir), the same model and
the same batch, it times --steps training steps after --warmup steps of

* the reference (``reference_train``, below): the study's pipeline as a newcomer would write it,
  PIL decoding of the original JPEGs on every access, torchvision v1 transforms, three forwards,
  fp32, ``nn.TripletMarginLoss``, Adam, a default DataLoader with 2 workers;
* the suite: the prepared copy (short side --resize), ``TrainTransform``, ``TripletCUBDataset``,
  ``engine.make_loader`` with ``engine.default_workers`` and ``engine.train_one_epoch`` with
  ``--precision auto`` and channels_last, as ``scripts/train.py`` runs them;

and the suite's evaluation embedding (``engine.embed`` of the prepared test images, repeated to
--steps x --batch-size images). Each measurement runs in a fresh process, so the peak memory
reported for it is its own (Linux VmHWM of the main process; CUDA: max_memory_allocated too).
Achieved FLOP/s, from torchvision's GMACs (training = 3 images x 3 forwards per triplet), are
given as a share of a large matmul's FLOP/s measured in the same run, in the row's precision
(bf16 is measured only where the hardware has it: CUDA, AVX-512-bf16/AMX; else fp32's peak).

Writes --out (JSON) and a Markdown table beside it (same name, .md).
"""
import math
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from triplet import engine
from triplet.benchmark import (
    GMACS_224,
    forward_gflop,
    in_fresh_process,
    matmul_peak_gflops,
    memory_report,
    synchronize,
    timed_batches,
    train_gflop_per_triplet,
    write_results,
)
from triplet.cli import check, run
from triplet.data import ImageDataset, TripletCUBDataset, check_triplet_ready
from triplet.model import BACKBONES, build_model
from triplet.prepare import DataOptions, prepare, prepared_dir, read_manifest
from triplet.runs import cpu_name
from triplet.synthetic import ROOT, make_synthetic_cub
from triplet.transforms import EvalTransform, TrainTransform


@dataclass
class Options:
    backbones: list[str] = field(default_factory=lambda: list(BACKBONES), metadata={
        "nargs": "+", "choices": list(BACKBONES), "help": "trunks to benchmark (default: all of them)"})
    image_size: int = field(default=224, metadata={"help": "training crop and evaluation input size"})
    batch_size: int = field(default=32, metadata={"help": "triplets per training step (3x as many images)"})
    steps: int = field(default=10, metadata={"help": "timed training steps per path; 100 or more on a GPU"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (allocator, kernel choice, workers)"})
    eval_batch_size: int = field(default=128, metadata={"help": "images per batch when embedding"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda", "mps"], "help": "auto: cuda, then mps, then cpu"})
    also_bf16: bool = field(default=False, metadata={
        "help": "also time the suite with bf16 autocast forced, as a labelled extra row (when auto is fp32)"})
    out: str = field(default="results/train_benchmark.json", metadata={"help": "JSON result; the .md table goes beside it"})
    workdir: str = field(default="", metadata={
        "help": "folder for the synthetic images and their prepared copy, kept and reused (default: a temporary folder)"})
    classes: int = field(default=20, metadata={"help": "synthetic classes"})
    per_class: int = field(default=10, metadata={"help": "synthetic images per class (half train, half test)"})
    synthetic_size: int = field(default=500, metadata={"help": "width of the synthetic JPEGs; 500 gives CUB's 500x375"})
    resize: int = field(default=256, metadata={"help": "short side of the suite's prepared copy"})

    def __post_init__(self):
        check(self.steps >= 1, f"--steps {self.steps}: must be >= 1")
        check(self.warmup >= 0, f"--warmup {self.warmup}: must be >= 0")
        check(self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2")
        check(self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size}: must be >= 1")
        check(self.image_size >= 16, f"--image-size {self.image_size}: must be >= 16")
        check(self.out.endswith(".json"), f"--out {self.out}: must end in .json")
        check(self.per_class >= 4, f"--per-class {self.per_class}: must be >= 4 (two train images a class)")


# ---- the reference: deliberately plain, and not slowed down in any way ------------------------

class PlainTripletDataset(Dataset):
    """Anchor i, a random other image of its class and a random image of another class."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform
        self.by_class = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(i)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))

    def __getitem__(self, i):
        label = self.labels[i]
        positive = random.choice([j for j in self.by_class[label] if j != i])
        negative = random.choice(self.by_class[random.choice([c for c in self.by_class if c != label])])
        return self.load(i), self.load(positive), self.load(negative)


def reference_train(device, backbone, paths, labels, image_size, batch_size, warmup, steps):
    """The straightforward implementation a newcomer would write, timed as it is.

    It is an honest baseline, not a slowed-down one: the usual PIL + transforms v1 pipeline on
    the original JPEGs, two loader workers, the same model, optimiser and margin as the suite.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    transform = T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(PlainTripletDataset(paths, labels, transform), batch_size=batch_size,
                        shuffle=True, num_workers=2)
    model = build_model(backbone).to(device)
    criterion = nn.TripletMarginLoss(margin=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    seconds, running_loss = [], 0.0
    for anchor, positive, negative in timed_batches(loader, warmup, steps, device, seconds):
        anchor, positive, negative = anchor.to(device), positive.to(device), negative.to(device)
        loss = criterion(model(anchor), model(positive), model(negative))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return {"data": "original JPEGs, PIL + transforms v1", "precision": "fp32", "memory_format": "contiguous",
            "workers": 2, **_speed(seconds[0], steps, batch_size), **memory_report(device)}


# ---- the suite: its own data path and training step, reused from triplet/ ----------------------

def suite_train(device, backbone, paths, labels, image_size, batch_size, warmup, steps, precision):
    device = torch.device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as scripts/train.py
    workers = engine.default_workers(device)
    dataset = TripletCUBDataset(paths, labels, TrainTransform(image_size))
    loader = engine.make_loader(dataset, device, workers, batch_size=batch_size, shuffle=True, drop_last=True)
    model = build_model(backbone).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    seconds = []
    engine.train_one_epoch(model, timed_batches(loader, warmup, steps, device, seconds), optimizer, device,
                           precision, margin=1.0, progress=False)
    return {"data": "prepared copy, torchvision.io + transforms v2", "precision": precision,
            "memory_format": "channels_last", "workers": workers, **_speed(seconds[0], steps, batch_size),
            **memory_report(device)}


def suite_embed(device, backbone, paths, labels, image_size, batch_size, precision):
    device = torch.device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(backbone).to(device, memory_format=torch.channels_last).eval()
    with torch.inference_mode(), engine.autocast(device, precision):  # warm-up: kernels, caches
        model(engine.to_device(torch.zeros(min(batch_size, len(paths)), 3, image_size, image_size), device))
    workers = engine.default_workers(device)
    loader = engine.make_loader(ImageDataset(paths, labels, EvalTransform(image_size)), device, workers,
                                batch_size=batch_size)
    synchronize(device)
    start = time.perf_counter()
    engine.embed(model, loader, device, precision)  # returns NumPy: the device is done
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 2),
            "precision": precision, "workers": workers, **memory_report(device)}


def probe_machine(device):
    """The device, the suite's automatic precision, and the matmul peak in each precision used."""
    device = engine.resolve_device(device)
    precision = engine.resolve_precision("auto", device)
    dtypes = {"fp32": torch.float32}
    if (torch.cuda.is_bf16_supported() if device.type == "cuda" else engine.cpu_has_bf16()):
        dtypes["bf16"] = torch.bfloat16  # elsewhere bf16 is emulated: its matmul is no peak
    peaks = {name: round(matmul_peak_gflops(device, dtype), 1) for name, dtype in dtypes.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "auto_precision": precision, "cpu_has_bf16": engine.cpu_has_bf16(), "matmul_peak_gflops": peaks}


def _speed(seconds, steps, batch_size):
    return {"seconds": round(seconds, 3), "step_s": round(seconds / steps, 3),
            "triplets_per_s": round(steps * batch_size / seconds, 3)}


# ---- orchestration ------------------------------------------------------------------------------

def make_data(opts, workdir):
    """The synthetic set (its original JPEGs) and the suite's prepared copy; reused when present."""
    data_dir = Path(workdir) / f"synthetic-{opts.classes}x{opts.per_class}-{opts.synthetic_size}px"
    if not (data_dir / ROOT).exists():
        print(f"writing {opts.classes * opts.per_class} synthetic {opts.synthetic_size}-px JPEGs to {data_dir}")
        make_synthetic_cub(data_dir, opts.classes, opts.per_class, opts.synthetic_size, seed=0)
    options = DataOptions(data_dir=str(data_dir), resize=opts.resize)
    prepare(options, log=lambda *a: None)
    return data_dir / ROOT, prepared_dir(options)


def repeated(paths, labels, count):
    """The lists repeated until they hold at least ``count`` items (one epoch covers every step)."""
    times = math.ceil(count / len(paths))
    return paths * times, labels * times


def add_flops(row, gflop_per_item, rate_key, peaks):
    """Achieved GFLOP/s and its share of the matmul peak in the row's precision (else fp32's)."""
    gflops = row[rate_key] * gflop_per_item
    share_of = row["precision"] if row["precision"] in peaks else "fp32"
    row.update(gflops=round(gflops, 1), share_of_peak=round(gflops / peaks[share_of], 4), share_of=share_of)
    return row


def benchmark_backbone(opts, machine, backbone, train, test):
    device, peaks = machine["device"], machine["matmul_peak_gflops"]
    suite_paths, labels, originals = train
    common = dict(device=device, backbone=backbone, labels=labels, image_size=opts.image_size,
                  batch_size=opts.batch_size, warmup=opts.warmup, steps=opts.steps)
    per_triplet = train_gflop_per_triplet(backbone, opts.image_size)
    result = {}
    runs = [("reference", reference_train, {"paths": [str(p) for p in originals]}),
            ("suite", suite_train, {"paths": suite_paths, "precision": machine["auto_precision"]})]
    if opts.also_bf16 and machine["auto_precision"] != "bf16":
        runs.append(("suite_bf16_forced", suite_train, {"paths": suite_paths, "precision": "bf16"}))
    for name, function, extra in runs:
        row = add_flops(in_fresh_process(function, **common, **extra), per_triplet, "triplets_per_s", peaks)
        result[name] = row
        print(f"{backbone} {name:<17} {row['triplets_per_s']:8.2f} triplets/s  {row['step_s']:7.2f} s/step  "
              f"{row['precision']}, {row['workers']} workers, peak {_peak_mb(row):.0f} MiB, "
              f"{100 * row['share_of_peak']:.1f}% of the {row['share_of']} matmul peak")
    result["ratio"] = round(result["suite"]["triplets_per_s"] / result["reference"]["triplets_per_s"], 3)
    if "suite_bf16_forced" in result:
        result["ratio_bf16_forced"] = round(result["suite_bf16_forced"]["triplets_per_s"]
                                            / result["reference"]["triplets_per_s"], 3)
    embed_paths, embed_labels = repeated(*test, opts.steps * opts.batch_size)
    row = in_fresh_process(suite_embed, device=device, backbone=backbone, paths=embed_paths, labels=embed_labels,
                           image_size=opts.image_size, batch_size=opts.eval_batch_size,
                           precision=machine["auto_precision"])
    result["embedding"] = add_flops(row, forward_gflop(backbone, opts.image_size), "images_per_s", peaks)
    print(f"{backbone} embedding         {row['images_per_s']:8.2f} images/s    ({row['images']} images, "
          f"{row['precision']})")
    print(f"{backbone}: suite {result['suite']['triplets_per_s']:.2f} triplets/s, reference "
          f"{result['reference']['triplets_per_s']:.2f} triplets/s: {result['ratio']:.2f}x")
    return result


def _peak_mb(row):
    """The memory that limits the batch: CUDA's allocator peak on a GPU, else the process's RSS."""
    return row.get("peak_cuda_mb", row["peak_rss_mb"])


def markdown(report):
    m, s = report["machine"], report["settings"]
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in m["matmul_peak_gflops"].items())
    memory = ("torch.cuda.max_memory_allocated" if m["device"].startswith("cuda")
              else "the training process's RSS high-water mark, DataLoader workers not included")
    lines = [
        "# Training throughput: the suite versus a straightforward implementation", "",
        f"`{report['command']}`", "",
        f"{m['device']} ({m['name']}, {m['threads']} threads), torch {m['torch']}; measured matmul peak: {peaks}. "
        f"Synthetic {s['synthetic_size']}-px JPEGs ({s['images']} images), {s['image_size']}-px crops, "
        f"{s['batch_size']} triplets per step, {s['steps']} timed steps after {s['warmup']} warm-up steps, "
        f"each row in a fresh process. Peak memory: {memory}. The reference is the plain implementation in "
        f"scripts/benchmark_train.py.", "",
        "| Backbone | Path | Data | Precision | Workers | Triplets/s | vs reference | s/step | Peak memory (MiB) "
        "| Share of matmul peak |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, result in report["backbones"].items():
        reference = result["reference"]["triplets_per_s"]
        for name in ("reference", "suite", "suite_bf16_forced"):
            if name in result:
                r = result[name]
                label = {"suite_bf16_forced": "suite, bf16 forced"}.get(name, name)
                lines.append(f"| {backbone} | {label} | {r['data']} | {r['precision']}, {r['memory_format']} | "
                             f"{r['workers']} | {r['triplets_per_s']:.2f} | {r['triplets_per_s'] / reference:.2f}x | "
                             f"{r['step_s']:.2f} | {_peak_mb(r):,.0f} | {100 * r['share_of_peak']:.1f}% of {r['share_of']} |")
    lines += ["", "| Backbone | Embedding images/s | Precision | Peak memory (MiB) | Share of matmul peak |",
              "|---|---:|---|---:|---:|"]
    for backbone, result in report["backbones"].items():
        e = result["embedding"]
        lines.append(f"| {backbone} | {e['images_per_s']:.1f} | {e['precision']} | {_peak_mb(e):,.0f} | "
                     f"{100 * e['share_of_peak']:.1f}% of {e['share_of']} |")
    return "\n".join(lines) + "\n"


def main(opts):
    machine = in_fresh_process(probe_machine, device=opts.device)  # first: a bad --device fails fast
    print(f"{machine['device']} ({machine['name']}, {machine['threads']} threads): matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["matmul_peak_gflops"].items())
          + f"; suite precision {machine['auto_precision']}")
    with tempfile.TemporaryDirectory(prefix="triplet-bench-") as tmp:
        root, prepared = make_data(opts, opts.workdir or tmp)
        train_paths, train_labels = read_manifest(prepared, "train")
        check_triplet_ready(train_labels, f"training split of {prepared}")
        suite_paths, labels = repeated(train_paths, train_labels, (opts.warmup + opts.steps) * opts.batch_size)
        originals = [root / "images" / Path(p).relative_to(prepared / "images") for p in suite_paths]
        test = read_manifest(prepared, "test")
        backbones = {b: benchmark_backbone(opts, machine, b, (suite_paths, labels, originals), test)
                     for b in opts.backbones}
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "settings": {"image_size": opts.image_size, "batch_size": opts.batch_size, "steps": opts.steps,
                     "warmup": opts.warmup, "eval_batch_size": opts.eval_batch_size,
                     "synthetic_size": opts.synthetic_size, "images": opts.classes * opts.per_class,
                     "resize": opts.resize, "gmacs_224": {b: GMACS_224[b] for b in opts.backbones}},
        "machine": machine,
        "memory": "peak_rss_mb: VmHWM of the measuring process (Linux), DataLoader workers excluded; "
                  "worker_peak_rss_mb: the largest worker's, pages shared with the main process included; "
                  "peak_cuda_mb: torch.cuda.max_memory_allocated",
        "backbones": backbones,
    }
    write_results(opts.out, report, markdown(report))


if __name__ == "__main__":
    run(main, Options, __doc__)
